"""A VM with a virtio-net failover pair whose guest is played through QEMU's qtest
protocol, for the tests of the failover unplug (issue 13) against real QEMU 7.2 and 10.0.

No guest OS runs: QEMU starts with ``-S`` and a HLT BIOS, so no firmware touches PCI, and
the test does what a guest driver would over a ``-qtest`` chardev (which works beside KVM;
Debian's QEMU has no qtest accelerator)::

    with failover_vm(qemu, tmp) as fo:
        fo.guest.negotiate()          # standby: VERSION_1 + STANDBY -> FAILOVER_NEGOTIATED
        fo.plug_primary()             # device_add primary0 (failover_pair_id=standby0)
        fo.vm.cmd("cont")
        fo.vm.migrate(f"exec:cat > {tmp / 'stream'}")   # UNPLUG_PRIMARY, wait-unplug
        fo.eject()                    # the guest lets the primary go -> active
        fo.vm.wait_migration()

``fo.sock`` is a second QMP socket for vmtransport (QEMU serves one client per socket;
``fo.vm`` holds the first). The layout is that of QEMU's own failover test: q35, two
``pcie-root-port``s at 00:01.0 (root0, the standby) and 00:02.0 (root1, the primary).
A destination (``incoming=True``) has the primary on its command line, hidden until the
load brings the negotiated standby (FAILOVER_NEGOTIATED fires during ``migrate-incoming``).

A busy guest: ``bios="dirty"`` boots a tiny BIOS whose vCPU rewrites RAM while the VM runs
and stops with it (``Guest.arm_cpu_dirtier`` before ``cont``); ``Guest.dirty`` is a qtest
writer thread, faster but blind to the run state. ``FailoverVM.plug_generation`` is the
QMP-visible trace of a replug. Measured facts: /work/wt/notes/failover-facts.md.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemuvm import MIB, VM, VMError, make_ram_file

__all__ = [
    "DIRTY_CTRL",
    "PRIMARY",
    "PRIMARY_PROPS",
    "STANDBY",
    "FailoverVM",
    "Guest",
    "QtestError",
    "dirty_bios",
    "failover_vm",
    "halt_bios",
]

STANDBY = "standby0"
PRIMARY = "primary0"
ROOT_PORTS = ("root0", "root1")  # at 00:01.0 and 00:02.0; secondary buses 1 and 2
STANDBY_BUS = 1
PRIMARY_BUS = 2

# PCI configuration mechanism #1 and registers (PCI spec).
_CF8, _CFC = 0xCF8, 0xCFC
_COMMAND, _STATUS, _BAR0, _CAP_PTR = 0x04, 0x06, 0x10, 0x34
_CMD_MEMORY, _CMD_MASTER = 0x2, 0x4
_STATUS_CAP_LIST = 0x10
# virtio 1.x (virtio-pci modern): vendor capability, common configuration layout.
_CAP_VENDOR, _CFG_COMMON = 0x09, 1
_CC_DFSELECT, _CC_DF, _CC_GFSELECT, _CC_GF, _CC_STATUS = 0x00, 0x04, 0x08, 0x0C, 0x14
_S_ACKNOWLEDGE, _S_DRIVER, _S_DRIVER_OK, _S_FEATURES_OK = 1, 2, 4, 8
VIRTIO_F_VERSION_1 = 32
VIRTIO_NET_F_STANDBY = 62
# ICH9's ACPI PCI hotplug registers (QEMU hw/acpi/pcihp.c): the guest's _EJ0 writes the
# slot bitmask to EJ for the bus selected in BNUM.
ACPI_PCIHP_ICH9 = 0x0CC0
_PCIHP_UP, _PCIHP_DOWN, _PCIHP_EJ, _PCIHP_BNUM = 0x0, 0x4, 0x8, 0x10
# Where bridge windows go: bus N gets 16 MiB at 0xC0000000 + N*16 MiB (memory in the
# first half, prefetchable memory in the second), clear of RAM and of q35's MMCONFIG.
_WINDOW_BASE, _WINDOW_SIZE = 0xC0000000, 16 * MIB


class QtestError(Exception):
    """The qtest server refused a command, or the connection broke."""


def halt_bios(tmp: Path) -> Path:
    """64 KiB of HLT as the BIOS: the vCPU halts at the reset vector and writes no RAM."""
    path = tmp / "hlt.bin"
    if not path.exists():
        path.write_bytes(b"\xf4" * 65536)
    return path


# A busy guest that stops when the VM stops, as a real one does (a qtest writer would go on
# writing RAM while the VM is paused): at the reset vector, enter flat 32-bit protected
# mode; unless the control block holds the magic, halt; else rewrite [start, end) with
# `rep stosl` of a new non-zero dword per pass, count the passes, and halt once the stop
# flag is set (checked between passes). Assembled with `as --32` and
# `ld -m elf_i386 -Ttext 0 --oformat binary` from:
#
#   # A 64 KiB BIOS whose vCPU rewrites guest RAM for ever (tests/failover_guest.py).
#   # Control block in RAM at 0x7000 (written by the test over qtest before `cont`):
#   #   +0 magic "DIRT" (0x54524944) else halt, +4 stop flag (non-zero: halt),
#   #   +8 start address, +12 end address, +16 pass counter (written by the guest).
#       .set BASE, 0xF0000   # the ISA alias of the BIOS; reset vector: ljmp $0xf000, $0
#       .set CTRL, 0x7000
#       .code16
#       .text
#   start:
#       cli
#       lgdtl %cs:gdt_desc
#       movl %cr0, %eax
#       orl $1, %eax
#       movl %eax, %cr0
#       ljmpl $0x08, $(BASE + pm32)
#       .code32
#   pm32:
#       movw $0x10, %ax
#       movw %ax, %ds
#       movw %ax, %es
#       movw %ax, %fs           # a real-mode FS or GS left behind makes KVM emulate
#       movw %ax, %gs           # every instruction (~12 MB/s of writes)
#       movw %ax, %ss
#       cmpl $0x54524944, CTRL
#       jne halt
#       movl $0x5a000001, %ebx
#   again:
#       cmpl $0, CTRL + 4
#       jne halt
#       movl CTRL + 8, %edi
#       movl CTRL + 12, %ecx
#       subl %edi, %ecx
#       shrl $2, %ecx
#       movl %ebx, %eax
#       cld
#       rep stosl
#       incl CTRL + 16
#       addl $0x01010101, %ebx
#       orl $1, %ebx
#       jmp again
#   halt:
#       cli
#       hlt
#       jmp halt
#       .p2align 3
#   gdt:
#       .quad 0
#       .quad 0x00CF9B000000FFFF   # 0x08: flat 32-bit code } accessed bits set: else the
#       .quad 0x00CF93000000FFFF   # 0x10: flat 32-bit data } CPU writes them, into ROM,
#                                  # and KVM hangs at the far jump
#   gdt_desc:
#       .word gdt_desc - gdt - 1
#       .long BASE + gdt
_DIRTY_CODE = bytes.fromhex(
    "fa2e660f011688000f20c06683c8010f22c066ea1a000f00080066b810008ed8"
    "8ec08ee08ee88ed0813d00700000444952547535bb0100005a833d0470000000"
    "75278b3d087000008b0d0c70000029f9c1e90289d8fcf3abff051070000081c3"
    "0101010183cb01ebd0faf4ebfc8d76000000000000000000ffff0000009bcf00"
    "ffff00000093cf00170070000f00"
)
#: The dirtying guest's control block (guest-physical): magic, stop, start, end, passes.
DIRTY_CTRL = 0x7000
_DIRTY_MAGIC = 0x54524944  # "DIRT"


def dirty_bios(tmp: Path) -> Path:
    """The 64 KiB BIOS of the dirtying guest: its code at offset 0, HLT elsewhere, and at
    the reset vector (offset 0xFFF0) a far jump to F000:0000 (= offset 0)."""
    path = tmp / "dirty.bin"
    if not path.exists():
        image = bytearray(_DIRTY_CODE + b"\xf4" * (65536 - len(_DIRTY_CODE)))
        # ljmp $0xf000, $0: CS base 0xF0000 (the ISA alias): KVM here (no unrestricted
        # guest?) hangs on a far jump to protected mode from CS base 0xFFFF0000.
        image[0xFFF0:0xFFF5] = bytes.fromhex("ea000000f0")
        path.write_bytes(bytes(image))
    return path


def _pci_addr(bus: int, dev: int, fn: int, reg: int) -> int:
    return 0x80000000 | bus << 16 | dev << 11 | fn << 8 | (reg & 0xFC)


class Guest:
    """The guest's side, over QEMU's qtest chardev (one line per command; answers
    ``OK [VALUE]`` or ``FAIL ...``; ``IRQ ...`` lines may come in between and are kept
    in ``irqs``). Thread-safe: one command at a time."""

    def __init__(self, conn: socket.socket, vm: VM, timeout: float = 30.0) -> None:
        self._conn = conn
        self._vm = vm
        self._timeout = timeout
        self._buf = b""
        self._lock = threading.Lock()
        self.irqs: list[str] = []
        self.common_cfg: int | None = None  # address of the standby's common configuration
        self._dirtier: Dirtier | None = None

    # -- protocol
    def command(self, line: str) -> str:
        """Send one qtest command; return what follows ``OK`` (may be empty)."""
        with self._lock:
            self._conn.settimeout(self._timeout)
            try:
                self._conn.sendall(line.encode() + b"\n")
                while True:
                    reply = self._readline()
                    if reply.startswith("IRQ"):
                        self.irqs.append(reply)
                        continue
                    break
            except OSError as e:
                raise QtestError(f"qtest {line.split()[0]}: {e}") from e
        if reply == "OK" or reply.startswith("OK "):
            return reply[3:]
        raise QtestError(f"qtest {line!r}: {reply}")

    def _readline(self) -> str:
        while b"\n" not in self._buf:
            data = self._conn.recv(65536)
            if not data:
                raise ConnectionError("qtest connection closed by QEMU")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def close(self) -> None:
        self.stop_dirty()
        self._conn.close()

    def _value(self, line: str) -> int:
        return int(self.command(line), 0)

    def outb(self, port: int, value: int) -> None:
        self.command(f"outb {port:#x} {value:#x}")

    def outw(self, port: int, value: int) -> None:
        self.command(f"outw {port:#x} {value:#x}")

    def outl(self, port: int, value: int) -> None:
        self.command(f"outl {port:#x} {value:#x}")

    def inb(self, port: int) -> int:
        return self._value(f"inb {port:#x}")

    def inw(self, port: int) -> int:
        return self._value(f"inw {port:#x}")

    def inl(self, port: int) -> int:
        return self._value(f"inl {port:#x}")

    def readb(self, addr: int) -> int:
        return self._value(f"readb {addr:#x}")

    def readl(self, addr: int) -> int:
        return self._value(f"readl {addr:#x}")

    def writeb(self, addr: int, value: int) -> None:
        self.command(f"writeb {addr:#x} {value:#x}")

    def writel(self, addr: int, value: int) -> None:
        self.command(f"writel {addr:#x} {value:#x}")

    def memset(self, addr: int, size: int, value: int) -> None:
        self.command(f"memset {addr:#x} {size:#x} {value:#x}")

    def write(self, addr: int, data: bytes) -> None:
        self.command(f"write {addr:#x} {len(data):#x} 0x{data.hex()}")

    def read(self, addr: int, size: int) -> bytes:
        return bytes.fromhex(self.command(f"read {addr:#x} {size:#x}")[2:])

    # -- PCI configuration space (mechanism #1)
    def cfg_readl(self, bus: int, dev: int, reg: int) -> int:
        self.outl(_CF8, _pci_addr(bus, dev, 0, reg))
        return self.inl(_CFC)

    def cfg_readw(self, bus: int, dev: int, reg: int) -> int:
        self.outl(_CF8, _pci_addr(bus, dev, 0, reg))
        return self.inw(_CFC + (reg & 2))

    def cfg_readb(self, bus: int, dev: int, reg: int) -> int:
        self.outl(_CF8, _pci_addr(bus, dev, 0, reg))
        return self.inb(_CFC + (reg & 3))

    def cfg_writel(self, bus: int, dev: int, reg: int, value: int) -> None:
        self.outl(_CF8, _pci_addr(bus, dev, 0, reg))
        self.outl(_CFC, value)

    def cfg_writew(self, bus: int, dev: int, reg: int, value: int) -> None:
        self.outl(_CF8, _pci_addr(bus, dev, 0, reg))
        self.outw(_CFC + (reg & 2), value)

    # -- what a guest driver does
    def program_root_ports(self) -> None:
        """Give root port N (00:0N.0) secondary bus N and its memory windows, and
        enable it, as firmware would."""
        for bus in (STANDBY_BUS, PRIMARY_BUS):
            dev = bus  # root0 is 00:01.0 -> bus 1, root1 is 00:02.0 -> bus 2
            base = _WINDOW_BASE + bus * _WINDOW_SIZE
            half = _WINDOW_SIZE // 2
            self.cfg_writel(0, dev, 0x18, bus << 16 | bus << 8)  # subordinate, secondary, 0
            mem = (base >> 16) & 0xFFF0 | ((base + half - 1) >> 16 & 0xFFF0) << 16
            pref = ((base + half) >> 16) & 0xFFF0 | ((base + 2 * half - 1) >> 16 & 0xFFF0) << 16
            self.cfg_writel(0, dev, 0x20, mem)
            self.cfg_writel(0, dev, 0x24, pref)
            self.cfg_writel(0, dev, 0x28, 0)  # prefetchable upper 32 bits
            self.cfg_writel(0, dev, 0x2C, 0)
            self.cfg_writew(0, dev, _COMMAND, _CMD_MEMORY | _CMD_MASTER)

    def place_bars(self, bus: int, dev: int = 0) -> dict[int, int]:
        """Size and place the memory BARs of bus:dev.0 in its bridge's windows; enable
        memory decoding. Returns {BAR index: address}."""
        base = _WINDOW_BASE + bus * _WINDOW_SIZE
        next_addr = {False: base, True: base + _WINDOW_SIZE // 2}  # by prefetchable
        placed: dict[int, int] = {}
        i = 0
        while i < 6:
            reg = _BAR0 + 4 * i
            orig = self.cfg_readl(bus, dev, reg)
            if orig & 1:  # I/O BAR: not needed
                i += 1
                continue
            is64 = (orig >> 1) & 3 == 2
            prefetch = bool(orig & 8)
            self.cfg_writel(bus, dev, reg, 0xFFFFFFFF)
            mask = self.cfg_readl(bus, dev, reg) & ~0xF
            if is64:
                self.cfg_writel(bus, dev, reg + 4, 0xFFFFFFFF)
                mask |= self.cfg_readl(bus, dev, reg + 4) << 32
                size = (~mask + 1) & 0xFFFFFFFFFFFFFFFF
            else:
                size = (~mask + 1) & 0xFFFFFFFF
            if mask == 0:
                self.cfg_writel(bus, dev, reg, orig)
            else:
                addr = -(-next_addr[prefetch] // size) * size  # aligned to its size
                next_addr[prefetch] = addr + size
                self.cfg_writel(bus, dev, reg, addr & 0xFFFFFFFF)
                if is64:
                    self.cfg_writel(bus, dev, reg + 4, addr >> 32)
                placed[i] = addr
            i += 2 if is64 else 1
        self.cfg_writew(bus, dev, _COMMAND, _CMD_MEMORY | _CMD_MASTER)
        return placed

    def find_common_cfg(self, bus: int, bars: dict[int, int], dev: int = 0) -> int:
        """Walk bus:dev.0's capabilities for the virtio common configuration; return its
        address."""
        if not self.cfg_readw(bus, dev, _STATUS) & _STATUS_CAP_LIST:
            raise QtestError(f"{bus:02x}:{dev:02x}.0 has no capability list")
        ptr = self.cfg_readb(bus, dev, _CAP_PTR) & 0xFC
        seen = 0
        while ptr and seen < 48:
            cap_id = self.cfg_readb(bus, dev, ptr)
            if cap_id == _CAP_VENDOR and self.cfg_readb(bus, dev, ptr + 3) == _CFG_COMMON:
                bar = self.cfg_readb(bus, dev, ptr + 4)
                offset = self.cfg_readl(bus, dev, ptr + 8)
                if bar not in bars:
                    raise QtestError(f"virtio common cfg in BAR{bar}, which is not placed")
                return bars[bar] + offset
            ptr = self.cfg_readb(bus, dev, ptr + 1) & 0xFC
            seen += 1
        raise QtestError(f"{bus:02x}:{dev:02x}.0 has no virtio common configuration")

    def negotiate(self, *, standby: bool = True, timeout: float = 10.0) -> dict[str, Any]:
        """Be the standby's driver: enable the bridges, place the BARs, negotiate
        VERSION_1 (+ STANDBY unless ``standby=False``), FEATURES_OK, DRIVER_OK. With
        STANDBY, wait for and return the FAILOVER_NEGOTIATED event (else {})."""
        self.program_root_ports()
        bars = self.place_bars(STANDBY_BUS)
        cc = self.common_cfg = self.find_common_cfg(STANDBY_BUS, bars)
        self.writeb(cc + _CC_STATUS, 0)  # reset
        deadline = time.monotonic() + timeout
        while self.readb(cc + _CC_STATUS) != 0:
            if time.monotonic() > deadline:
                raise QtestError("the standby did not reset")
            time.sleep(0.01)
        self.writeb(cc + _CC_STATUS, _S_ACKNOWLEDGE | _S_DRIVER)
        offered = 0
        for word in (0, 1):
            self.writel(cc + _CC_DFSELECT, word)
            offered |= self.readl(cc + _CC_DF) << (32 * word)
        wanted = 1 << VIRTIO_F_VERSION_1 | (1 << VIRTIO_NET_F_STANDBY if standby else 0)
        if offered & wanted != wanted:
            raise QtestError(f"the standby offers features {offered:#x}, not {wanted:#x}")
        for word in (0, 1):
            self.writel(cc + _CC_GFSELECT, word)
            self.writel(cc + _CC_GF, wanted >> (32 * word) & 0xFFFFFFFF)
        self.writeb(cc + _CC_STATUS, _S_ACKNOWLEDGE | _S_DRIVER | _S_FEATURES_OK)
        if not self.readb(cc + _CC_STATUS) & _S_FEATURES_OK:
            raise QtestError("the standby refused the features")
        self.writeb(cc + _CC_STATUS, _S_ACKNOWLEDGE | _S_DRIVER | _S_FEATURES_OK | _S_DRIVER_OK)
        if not standby:
            return {}
        return self._vm.qmp.wait_event("FAILOVER_NEGOTIATED", timeout=timeout)

    def eject(self, bsel: int, slot: int = 0) -> None:
        """What the guest's ACPI _EJ0 does: select the bus (its ACPI hotplug number
        ``bsel``) and write the slot's bit to the eject register."""
        self.outl(ACPI_PCIHP_ICH9 + _PCIHP_BNUM, bsel)
        self.outl(ACPI_PCIHP_ICH9 + _PCIHP_EJ, 1 << slot)

    def pending_down(self, bsel: int) -> int:
        """The bitmask of slots QEMU asks the guest to remove on bus ``bsel``."""
        self.outl(ACPI_PCIHP_ICH9 + _PCIHP_BNUM, bsel)
        return self.inl(ACPI_PCIHP_ICH9 + _PCIHP_DOWN)

    # -- a busy guest
    def dirty(self, start: int, end: int, chunk: int = 8 * MIB) -> Dirtier:
        """Start rewriting guest RAM [start, end) over and over (qtest ``memset`` of
        ``chunk`` bytes at a time, a new non-zero value each pass; ~9 GiB/s here) in a
        thread; stop it with ``stop_dirty()`` or the returned object's ``stop()``. It
        goes on while the VM is paused, unlike a real guest: stop it before ``stop``, or
        use the dirtying BIOS when something else stops the VM."""
        self.stop_dirty()
        self._dirtier = Dirtier(self, start, end, chunk)
        self._dirtier.start()
        return self._dirtier

    def stop_dirty(self) -> int:
        """Stop the dirtying thread if any; return the bytes it wrote."""
        d, self._dirtier = self._dirtier, None
        return d.stop() if d is not None else 0

    # -- a busy guest whose own vCPU writes (failover_vm(..., bios="dirty"))
    def arm_cpu_dirtier(self, start: int, end: int) -> None:
        """Before ``cont``: tell the dirtying BIOS to rewrite [start, end) (4-byte
        aligned, inside RAM, clear of the control block's page) until stopped. It then
        runs exactly while the VM runs."""
        if start % 4 or end % 4 or not DIRTY_CTRL + 4096 <= start < end:
            raise ValueError(f"bad dirtying range [{start:#x}, {end:#x})")
        self.write(
            DIRTY_CTRL,
            b"".join(v.to_bytes(4, "little") for v in (_DIRTY_MAGIC, 0, start, end, 0)),
        )

    def stop_cpu_dirtier(self, timeout: float = 10.0) -> int:
        """Set the stop flag; if the VM runs, wait until the vCPU has finished its pass
        (the counter stops moving). Returns the passes made."""
        self.writel(DIRTY_CTRL + 4, 1)
        passes = self.cpu_dirtier_passes()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = self.cpu_dirtier_passes()
            if now == passes:
                return now
            passes = now
        raise QtestError("the dirtying guest did not stop")

    def cpu_dirtier_passes(self) -> int:
        return self.readl(DIRTY_CTRL + 16)


class Dirtier:
    """The thread of ``Guest.dirty``."""

    def __init__(self, guest: Guest, start: int, end: int, chunk: int) -> None:
        self.guest, self.start_addr, self.end, self.chunk = guest, start, end, chunk
        self.written = 0
        self.passes = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qtest-dirty", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        value = 1
        try:
            while not self._stop.is_set():
                addr = self.start_addr
                while addr < self.end and not self._stop.is_set():
                    n = min(self.chunk, self.end - addr)
                    self.guest.memset(addr, n, value)
                    self.written += n
                    addr += n
                self.passes += 1
                value = value % 255 + 1  # never 0: zero pages would travel as flags
        except BaseException as e:  # reported by stop()
            self.error = e

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.error is not None and not isinstance(self.error, (QtestError, ConnectionError)):
            raise self.error
        return self.written


@dataclass
class FailoverVM:
    """A started failover VM: the harness's VM (first QMP socket), the qtest guest,
    vmtransport's QMP socket, and its RAM file."""

    vm: VM
    guest: Guest
    sock: str
    ram_file: Path
    mem_mib: int
    incoming: bool
    _bsel: int | None = field(default=None, repr=False)

    def plug_primary(self) -> None:
        """device_add the primary (an e1000e on root1, paired with the standby). Before
        the standby is negotiated QEMU keeps it hidden."""
        self.vm.cmd("device_add", {**PRIMARY_PROPS, "rombar": 0})

    def bsel(self) -> int:
        """The ACPI hotplug number of the primary's bus (root1's secondary bus)."""
        if self._bsel is None:
            # A root port's secondary bus is its child named like the port. Seen on 7.2
            # and 10.0: root1's bus is 0, root0's is 1 (so BNUM's reset value 0 selects it).
            path = f"/machine/peripheral/{ROOT_PORTS[1]}/{ROOT_PORTS[1]}"
            self._bsel = int(self.vm.cmd("qom-get", path=path, property="acpi-pcihp-bsel"))
        return self._bsel

    def eject(self) -> None:
        """The guest lets the primary go (ACPI eject of root1's slot 0)."""
        self.guest.eject(self.bsel(), 0)

    def plug_generation(self) -> int:
        """N of the ``child[N]`` link naming the primary on its bus: 0 after device_add,
        one more at every replug (QEMU re-parents the device), unchanged by an unplug.
        The only QMP-visible trace of a replug (seen on 7.2 and 10.0)."""
        bus = self.vm.cmd("qom-get", path=f"/machine/peripheral/{PRIMARY}", property="parent_bus")
        for prop in self.vm.cmd("qom-list", path=bus):
            name = str(prop["name"])
            if name.startswith("child[") and str(prop["type"]).startswith("link<"):
                target = self.vm.cmd("qom-get", path=bus, property=name)
                if target == f"/machine/peripheral/{PRIMARY}":
                    return int(name[len("child[") : -1])
        raise VMError(f"{PRIMARY} is not linked from its bus {bus}")

    def unplug_requested(self) -> bool:
        """True while QEMU asks the guest to remove the primary (ACPI 'down' bit)."""
        return bool(self.guest.pending_down(self.bsel()) & 1)


#: device_add arguments of the primary: an e1000e on root1 paired with the standby, no
#: option ROM (nothing would run it).
PRIMARY_PROPS: dict[str, str] = {
    "driver": "e1000e",
    "id": PRIMARY,
    "bus": ROOT_PORTS[1],
    "netdev": "hs1",
    "failover_pair_id": STANDBY,
    "rombar": "0",
    "romfile": "",
    "mac": "52:54:00:11:22:34",
}


def primary_device() -> str:
    """The primary as a ``-device`` argument."""
    props = dict(PRIMARY_PROPS)
    driver = props.pop("driver")
    return ",".join([driver, *(f"{k}={v}" for k, v in props.items())])


def _listen(path: str) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    srv.bind(path)
    os.chmod(path, 0o600)
    srv.listen(1)
    return srv


@contextmanager
def failover_vm(
    qemu: str,
    tmp: Path,
    *,
    name: str = "src",
    incoming: bool = False,
    mem_mib: int = 64,
    random_ram: bool = True,
    primary_on_cmdline: bool | None = None,
    bios: str = "halt",
    accel: str | None = None,
    extra_args: list[str] | None = None,
    paused: bool = True,
) -> Iterator[FailoverVM]:
    """Start QEMU (q35, ``-S``, KVM when usable, a HLT BIOS) with the standby on root0
    and a qtest chardev; yield a FailoverVM.

    ``incoming=True`` starts a destination (``-incoming defer``, RAM zeroed) whose
    primary is on the command line (hidden by QEMU until the standby is negotiated);
    a source's primary is on the command line only with ``primary_on_cmdline=True``,
    else the test plugs it with ``plug_primary()`` after ``negotiate()``. A source's RAM
    file is random when ``random_ram``. ``bios="dirty"`` boots the dirtying guest
    (``Guest.arm_cpu_dirtier`` before ``cont``; TCG unless ``accel`` says otherwise);
    the default halts. ``paused=False`` drops ``-S`` (for a destination that should run
    after the load; a source needs ``-S`` until ``negotiate()``).
    """
    if primary_on_cmdline is None:
        primary_on_cmdline = incoming
    ram = tmp / f"{name}.ram"
    ram.unlink(missing_ok=True)
    make_ram_file(ram, mem_mib, random=random_ram and not incoming)
    sockdir = tempfile.mkdtemp(prefix="vmtfo-")
    qtest_path = os.path.join(sockdir, "qtest.sock")
    sock = os.path.join(sockdir, "qmp2.sock")
    args = [
        "-qmp", f"unix:{sock},server=on,wait=off",
        "-bios", str(dirty_bios(tmp) if bios == "dirty" else halt_bios(tmp)),
        "-device", f"pcie-root-port,id={ROOT_PORTS[0]},bus=pcie.0,addr=0x1,chassis=1",
        "-device", f"pcie-root-port,id={ROOT_PORTS[1]},bus=pcie.0,addr=0x2,chassis=2",
        "-netdev", "hubport,id=hs0,hubid=0",
        "-netdev", "hubport,id=hs1,hubid=1",
        "-device",
        f"virtio-net-pci,id={STANDBY},bus={ROOT_PORTS[0]},netdev=hs0,failover=on,"
        "mac=52:54:00:11:22:33,rombar=0,romfile=",
        "-qtest", f"unix:{qtest_path}",
        "-qtest-log", "/dev/null",
        *(["-device", primary_device()] if primary_on_cmdline else []),
        *(extra_args or []),
    ]  # fmt: skip
    srv = _listen(qtest_path)
    vm = VM(
        qemu,
        tmp,
        name=name,
        mem_mib=mem_mib,
        ram_file=ram,
        paused=paused,
        incoming="defer" if incoming else None,
        extra_args=args,
        machine="q35",
        # The dirtying guest runs on TCG unless told otherwise: on this machine's KVM
        # every first write to a page after a dirty-log sync faults (~12 MB/s of
        # writes); TCG writes ~750 MiB/s, into QEMU's own dirty bitmap.
        accel=accel or ("tcg" if bios == "dirty" else None),
    )
    guest: Guest | None = None
    try:
        vm.start()
        srv.settimeout(30)
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            raise VMError(f"QEMU {name} did not connect its qtest chardev\n{vm.log()}") from None
        guest = Guest(conn, vm)
        yield FailoverVM(vm, guest, sock, ram, mem_mib, incoming)
    finally:
        if guest is not None:
            with suppress(Exception):
                guest.stop_dirty()
        vm.close()
        if guest is not None:
            guest.close()
        srv.close()
        for p in (qtest_path, sock):
            Path(p).unlink(missing_ok=True)
        with suppress(OSError):
            os.rmdir(sockdir)
