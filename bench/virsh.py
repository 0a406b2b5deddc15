"""The benchmark's libvirt side: a real libvirtd (Debian's libvirt-daemon-system), started
without systemd when none runs, and ``virsh save/restore --bypass-cache`` of a transient
domain of the benchmark's shape, timed from the command until it returns (for a
restore: a VM that is loaded, paused).

The domain: machine ``pc``, 1 vCPU, MEM MiB of libvirt's default memory (anonymous,
``memory-backend-ram``), no devices (no USB, no balloon), started paused. Its RAM is
made the source's random RAM by writing the RAM file into QEMU's process memory
(``/proc/PID/mem``, at the one anonymous mapping of exactly MEM MiB), and a restore is
checked the same way, reading it back. Needs root.
"""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import time
from pathlib import Path

URI = "qemu:///system"
SYSTEM_QEMU = "/usr/bin/qemu-system-x86_64"
DOMAIN = "vmtbench-virsh"
VIRSH = "/usr/bin/virsh"
LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOGD = "/usr/sbin/virtlogd"
SOCK = Path("/run/libvirt/libvirt-sock")
LOGD_SOCK = Path("/run/libvirt/virtlogd-sock")
CHUNK = 16 << 20

DOMAIN_XML = """<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <clock offset='utc'/>
  <devices>
    <emulator>{qemu}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class Unavailable(Exception):
    """libvirt cannot be used here; the message says why (the contenders are skipped)."""


def virsh(*args: str, check: bool = True, timeout: float = 600) -> str:
    r = subprocess.run([VIRSH, "-q", "-c", URI, *args], capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode:
        raise RuntimeError(f"virsh {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


class Libvirt:
    """The libvirtd to use: the running one, or one this process starts (and stops)."""

    def __init__(self) -> None:
        self.started: list[int] = []  # pids of the daemons started here

    def __enter__(self) -> Libvirt:
        for prog in (VIRSH, LIBVIRTD, VIRTLOGD):
            if not os.access(prog, os.X_OK):
                raise Unavailable(f"{prog} not installed (apt-get install "
                                  "libvirt-daemon-system libvirt-clients)")
        if subprocess.run([VIRSH, "-c", URI, "version"], capture_output=True).returncode:
            self._start()
        self._kvm_for_qemu_user()
        virsh("destroy", DOMAIN, check=False)
        return self

    def __exit__(self, *exc: object) -> None:
        virsh("destroy", DOMAIN, check=False)
        for pid in reversed(self.started):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        self.started.clear()

    def _start(self) -> None:
        """Start virtlogd and libvirtd as daemons, as their systemd units would."""
        for prog, sock, pidfile in ((VIRTLOGD, LOGD_SOCK, "/run/virtlogd.pid"),
                                    (LIBVIRTD, SOCK, "/run/libvirtd.pid")):
            if sock.exists() and _listening(sock):
                continue
            r = subprocess.run([prog, "-d"], capture_output=True, text=True)
            if r.returncode:
                raise Unavailable(f"{prog} -d failed: {r.stderr.strip()}")
            deadline = time.monotonic() + 30
            while not (sock.exists() and _listening(sock)):
                if time.monotonic() > deadline:
                    raise Unavailable(f"{prog} started but {sock} did not open in 30 s")
                time.sleep(0.1)
            try:
                self.started.append(int(Path(pidfile).read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass  # it runs; it just will not be stopped at the end

    @staticmethod
    def _kvm_for_qemu_user() -> None:
        """libvirt runs QEMU as libvirt-qemu (group kvm); without udev /dev/kvm may be
        root's alone: give it to group kvm, mode 0660, as Debian's udev rule does."""
        st = os.stat("/dev/kvm")
        try:
            kvm = grp.getgrnam("kvm").gr_gid
        except KeyError as exc:
            raise Unavailable("no group kvm (is libvirt-daemon-system installed?)") from exc
        if st.st_gid != kvm or not st.st_mode & stat.S_IRGRP & stat.S_IWGRP:
            os.chown("/dev/kvm", -1, kvm)
            os.chmod("/dev/kvm", 0o660)


def _listening(sock: Path) -> bool:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


def qemu_pid() -> int:
    return int(Path(f"/run/libvirt/qemu/{DOMAIN}.pid").read_text().split()[0])


def _ram_address(pid: int, size: int) -> int:
    """The host address of the guest's RAM in QEMU: its one anonymous read-write mapping
    of exactly ``size`` bytes (QEMU maps memory-backend-ram 2 MiB-aligned, guard pages
    apart)."""
    found = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if hi - lo == size and fields[1] == "rw-p" and len(fields) == 5:
                found.append(lo)
    if len(found) != 1:
        raise RuntimeError(f"QEMU {pid}: {len(found)} anonymous mappings of {size} bytes")
    return found[0]


def copy_ram(pid: int, ram_file: Path, *, into_guest: bool) -> bool:
    """Write ``ram_file`` into the guest's RAM, or compare the guest's RAM with it
    (returns whether they are equal)."""
    size = ram_file.stat().st_size
    addr = _ram_address(pid, size)
    mem = os.open(f"/proc/{pid}/mem", os.O_RDWR if into_guest else os.O_RDONLY)
    try:
        with open(ram_file, "rb") as f:
            for off in range(0, size, CHUNK):
                want = f.read(CHUNK)
                if into_guest:
                    os.pwrite(mem, want, addr + off)
                elif os.pread(mem, len(want), addr + off) != want:
                    return False
    finally:
        os.close(mem)
    return True


def start_source(qemu: str, mem_mib: int, ram_file: Path, work: Path) -> None:
    """A paused transient domain whose RAM is ``ram_file``'s content."""
    xml = work / "virsh-domain.xml"
    xml.write_text(DOMAIN_XML.format(name=DOMAIN, mem=mem_mib, qemu=os.path.realpath(qemu)))
    virsh("create", "--paused", str(xml))
    copy_ram(qemu_pid(), ram_file, into_guest=True)


def save(image: Path) -> float:
    """``virsh save --bypass-cache`` of the (paused) domain; its wall time."""
    start = time.monotonic()
    virsh("save", "--bypass-cache", DOMAIN, str(image))
    return time.monotonic() - start


def restore(image: Path) -> float:
    """``virsh restore --bypass-cache --paused``: returns once QEMU has loaded the
    image (libvirt waits for the migration to complete); its wall time."""
    start = time.monotonic()
    virsh("restore", "--bypass-cache", "--paused", str(image))
    return time.monotonic() - start


def destroy() -> None:
    virsh("destroy", DOMAIN, check=False)
