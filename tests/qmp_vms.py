"""VMs driven over a second QMP socket, for the tests of ``save --qmp``/``restore --qmp``
and the API's examples: a source with random RAM, a destination started with
``-incoming defer``. (tests/qemuvm.py's harness holds each VM's first socket: QEMU
serves one client per socket.)"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import MEM_MIB
from qemuvm import VM, make_ram_file


def halt_bios(tmp: Path) -> list[str]:
    """64 KiB of HLT as the BIOS: a running guest that writes no RAM, so a destination
    that runs can still be compared with its source (see test_qmp_save.py)."""
    path = tmp / "hlt.bin"
    if not path.exists():
        path.write_bytes(b"\xf4" * 65536)
    return ["-bios", str(path)]


def qmp_socket(tag: str) -> str:
    return f"/tmp/vmt-{tag}-{os.getpid()}-{time.monotonic_ns()}.sock"


@contextmanager
def source_vm(qemu: str, tmp: Path, *, paused: bool) -> Iterator[tuple[VM, str]]:
    """A VM with 64 MiB of random RAM and a second QMP socket for vmtransport."""
    ram = tmp / "src.ram"
    make_ram_file(ram, MEM_MIB, random=True)
    sock = qmp_socket("src")
    args = ["-qmp", f"unix:{sock},server=on,wait=off", "-name", "web1", *halt_bios(tmp)]
    try:
        with VM(
            qemu, tmp, name="src", mem_mib=MEM_MIB, ram_file=ram, paused=paused, extra_args=args
        ) as vm:
            yield vm, sock
    finally:
        Path(sock).unlink(missing_ok=True)


@contextmanager
def destination(
    qemu: str,
    tmp: Path,
    *,
    name: str = "dst",
    stopped: bool = False,
    bios: bool = True,
    mem_mib: int = MEM_MIB,
) -> Iterator[tuple[VM, str]]:
    """A QEMU started with ``-incoming defer`` (and ``-S`` if ``stopped``), zeroed RAM."""
    ram = tmp / f"{name}.ram"
    ram.unlink(missing_ok=True)
    make_ram_file(ram, mem_mib, random=False)
    sock = qmp_socket(name)
    args = ["-qmp", f"unix:{sock},server=on,wait=off", *(halt_bios(tmp) if bios else [])]
    try:
        with VM(
            qemu,
            tmp,
            name=name,
            mem_mib=mem_mib,
            ram_file=ram,
            paused=stopped,
            incoming="defer",
            extra_args=args,
        ) as vm:
            yield vm, sock
    finally:
        Path(sock).unlink(missing_ok=True)
