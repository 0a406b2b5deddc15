#!/usr/bin/env python3
"""How soon does QEMU get its stream? ``restore --qmp`` against the ``exec:`` restore,
paired, in rounds; a probe that tolerates a busy machine (it compares within a round).

    .venv/bin/python bench/handoff_probe.py [--mem-mib 1024] [--rounds 5] [--qemu 7.2]
        [--variant NAME=PATH]... [--dir DIR]

A source VM of random RAM is saved once (``exec:vmtransport save odirect:IMG``). Each
round restores that image once per contender, in a rotated order, into a fresh
destination (``-incoming defer``, anonymous RAM, warmed as bench.py does), the image
evicted from the page cache first:

  exec        ``migrate-incoming exec:vmtransport restore odirect:IMG`` (bench.py's row),
              timed from migrate-incoming
  qmp         ``vmtransport restore --qmp SOCK odirect:IMG --paused``, timed from its start
  qmp NAME    the same with another checkout (``--variant``, as bench.py's: e.g. the code
              before this change, ``git archive COMMIT | tar -x -C DIR``)

Printed per contender, medians over the rounds: ``first``, seconds until QEMU has read
its first 16 KiB of anything (QEMU's ``rchar`` in /proc/PID/io, polled every 0.5 ms:
the stream's first bytes; QMP's own lines are far fewer), ``done``, seconds until the
destination leaves ``inmigrate`` (bench.py's figure), ``load`` = done - first, and
``paired``: exec's / this one's in the same round, median over rounds, of ``done``
(>= 0.97 is the issue's target) and of ``load`` (what the helper costs QEMU once it
loads: CPU it takes from QEMU, say).
Needs root (KVM).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from qemuvm import VM, find_qemus, make_ram_file  # noqa: E402

import bench  # noqa: E402

VMT = bench.VMT
FIRST_BYTES = 16 << 10


def rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/io: no rchar")


class FirstRead(threading.Thread):
    """Notes when QEMU ``pid`` has read FIRST_BYTES more than when started."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.base = rchar(pid)
        self.at: float | None = None
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            try:
                if rchar(self.pid) - self.base >= FIRST_BYTES:
                    self.at = time.monotonic()
                    return
            except OSError:
                return
            time.sleep(0.0005)


def restore(qemu: str, work: Path, mem: int, image: Path, name: str,
            argv: list[str] | None) -> tuple[float, float]:
    """(first, done) seconds of one restore; argv None: exec:, else a --qmp command."""
    sock = f"/tmp/vmtprobe-dst-{os.getpid()}.sock"
    ram = Path("/dev/shm/vmtprobe-dst.ram")
    ram.unlink(missing_ok=True)
    make_ram_file(ram, mem, random=False)
    bench.cold_images(work)
    bench.dst_history(mem)
    err = work / "helper.err"
    with bench.AnonVM(qemu, work, name="dst", mem_mib=mem, ram_file=ram, incoming="defer",
                      extra_args=["-qmp", f"unix:{sock},server=on,wait=off"]) as vm:
        vm.cmd("migrate-set-capabilities",
               {"capabilities": [{"capability": "events", "state": True}]})
        first = FirstRead(vm.pid)
        proc = None
        first.start()
        start = time.monotonic()
        if argv is None:
            vm.cmd("migrate-incoming", {"uri": f"exec:{VMT} restore odirect:{image}"})
        else:
            with open(err, "wb") as f:
                proc = subprocess.Popen([*argv, "restore", "--qmp", sock, f"odirect:{image}",
                                         "--paused", "--no-progress"],
                                        stdin=subprocess.DEVNULL, stdout=f, stderr=f)
        try:
            status = vm.wait_incoming(timeout=300, poll=0.005)
            done = time.monotonic() - start
            if proc is not None and proc.wait(timeout=300):
                raise RuntimeError(f"{name}: {err.read_text()}")
        finally:
            first.stop = True
            if proc is not None and proc.poll() is None:
                proc.kill()
        if status not in ("paused", "prelaunch"):
            raise RuntimeError(f"{name}: destination ended {status}")
        first.join()
        if first.at is None:
            raise RuntimeError(f"{name}: QEMU's first read not seen")
    ram.unlink(missing_ok=True)
    Path(sock).unlink(missing_ok=True)
    return first.at - start, done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mem-mib", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--qemu", default="7.2")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--dir", default="/var/tmp/vmtprobe")
    args = p.parse_args()
    qemu = find_qemus()[args.qemu]
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    for f in work.iterdir():
        f.unlink()
    contenders: list[tuple[str, list[str] | None]] = [("exec", None), ("qmp", [VMT])]
    for spec in args.variant:
        v = bench.parse_variant(spec)
        env = [f"{k}={val}" for k, val in v.env.items()]
        contenders.append((f"qmp {v.name}", [*(["env", *env] if env else []), *v.argv]))
    src_ram = Path("/dev/shm/vmtprobe-src.ram")
    make_ram_file(src_ram, args.mem_mib, random=True)
    image = work / "img"
    with VM(qemu, work, name="src", mem_mib=args.mem_mib, ram_file=src_ram, paused=True) as vm:
        vm.migrate(f"exec:{VMT} save odirect:{image}")
        if vm.wait_migration(timeout=300)["status"] != "completed":
            raise RuntimeError("the save failed")
    src_ram.unlink()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in contenders}
    load0 = os.getloadavg()
    for rnd in range(args.rounds):
        k = rnd % len(contenders)
        for name, argv in contenders[k:] + contenders[:k]:
            runs[name].append(restore(qemu, work, args.mem_mib, image, name, argv))
            print(f"round {rnd + 1} {name}: first {runs[name][-1][0]:.3f} s, "
                  f"done {runs[name][-1][1]:.3f} s", flush=True)
    load1 = os.getloadavg()
    print(f"\n{args.mem_mib} MiB, QEMU {args.qemu}, {args.rounds} rounds; load average "
          f"{load0[0]:.2f} at the start, {load1[0]:.2f} at the end\n")
    print("| contender | first s | done s | load s | paired exec/this: done | load "
          "| done runs |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, rs in runs.items():
        pairs = list(zip(runs["exec"], rs, strict=True))
        paired = statistics.median(e[1] / r[1] for e, r in pairs)
        loads = statistics.median((e[1] - e[0]) / (r[1] - r[0]) for e, r in pairs)
        print(f"| {name} | {statistics.median(r[0] for r in rs):.3f} | "
              f"{statistics.median(r[1] for r in rs):.3f} | "
              f"{statistics.median(r[1] - r[0] for r in rs):.3f} | {paired:.3f} | "
              f"{loads:.3f} | " + " ".join(f"{r[1]:.2f}" for r in rs) + " |")


if __name__ == "__main__":
    main()
