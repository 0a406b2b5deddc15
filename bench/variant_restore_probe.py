#!/usr/bin/env python3
"""Restores of one image into QEMU by two (or more) vmtransport builds, in paired rounds.

    .venv/bin/python bench/variant_restore_probe.py EXE_A EXE_B [...]
        (ROUNDS=6 QEMU=/usr/bin/qemu-system-x86_64 MEM_MIB=2048 in the environment)

EXE: a ``vmtransport`` executable (another checkout's ``.venv/bin/vmtransport``). A
source VM of random RAM is saved once to an image on disk (``/var/tmp/vmt-variant-probe``)
by the first EXE; every round then restores it once per EXE, the order alternating, into
a destination like bench.py's (anonymous RAM, warm, ``-incoming defer``), timed from
``migrate-incoming "exec:EXE restore odirect:IMG"`` until QEMU leaves ``inmigrate``,
with the image evicted from the page cache first. Prints each run and the medians.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from qemuvm import VM, make_ram_file  # noqa: E402

import bench  # noqa: E402


def main() -> None:
    exes = sys.argv[1:]
    if len(exes) < 2:
        sys.exit(__doc__)
    qemu = os.environ.get("QEMU", "/usr/bin/qemu-system-x86_64")
    mem = int(os.environ.get("MEM_MIB", "2048"))
    rounds = int(os.environ.get("ROUNDS", "6"))
    work = Path("/var/tmp/vmt-variant-probe")
    work.mkdir(exist_ok=True)
    img = work / "img.sav"
    if not img.exists():
        src_ram = Path("/dev/shm/vmt-variant-probe-src.ram")
        make_ram_file(src_ram, mem, random=True)
        with VM(qemu, work, name="src", mem_mib=mem, ram_file=src_ram, paused=True) as vm:
            vm.cmd("migrate-set-parameters", {"max-bandwidth": 100 << 30})
            vm.migrate(f"exec:{exes[0]} save odirect:{img}")
            assert vm.wait_migration(timeout=300)["status"] == "completed", vm.log()
        src_ram.unlink()
    times: dict[str, list[float]] = {exe: [] for exe in exes}
    for rnd in range(rounds):
        for exe in exes if rnd % 2 == 0 else exes[::-1]:
            bench.cold_images(work)
            bench.dst_history(mem)
            dst_ram = Path("/dev/shm/vmt-variant-probe-dst.ram")
            dst_ram.unlink(missing_ok=True)
            make_ram_file(dst_ram, mem, random=False)
            err = work / f"err{exes.index(exe)}"
            with bench.AnonVM(qemu, work, name="dst", mem_mib=mem, ram_file=dst_ram,
                              incoming="defer") as vm:  # fmt: skip
                start = time.monotonic()
                vm.cmd("migrate-incoming", {"uri": f"exec:{exe} restore odirect:{img} 2>{err}"})
                status = vm.wait_incoming(timeout=600, poll=0.005)
                seconds = time.monotonic() - start
            dst_ram.unlink(missing_ok=True)
            assert status == "prelaunch", (exe, status, err.read_text())
            times[exe].append(seconds)
            print(rnd, exe, f"{seconds:.3f}", flush=True)
    for exe, xs in times.items():
        print(exe, "median", f"{sorted(xs)[len(xs) // 2]:.3f}", "runs", *(f"{x:.2f}" for x in xs))


if __name__ == "__main__":
    main()
