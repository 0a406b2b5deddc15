#!/usr/bin/env python3
"""How fast can fresh memory of each kind be filled? The core of a restore's load without
QEMU: copy SIZE MiB of random bytes, 32 KiB at a time (QEMU 7.2's read size), into memory
never touched before, as QEMU's ram_load does into the destination's RAM.

    python3 bench/fault_probe.py [--mib 2048] [--rounds 3]

Kinds: anon+THP (anonymous, MADV_HUGEPAGE, as QEMU's memory-backend-ram), anon 4K
(MADV_NOHUGEPAGE), shm shared (a MAP_SHARED file on /dev/shm, as the benchmark's
memory-backend-file,share=on), shm prefaulted (the same, its pages allocated first with
MADV_POPULATE_WRITE, as prealloc=on; the prefault's time is printed apart).
Printed: seconds, CPU seconds, minor faults, per kind and round (paired, rotated order).
"""

import argparse
import mmap
import os
import resource
import statistics
import time

MIB = 1 << 20
STEP = 32 << 10
MADV_POPULATE_WRITE = 23


VMSTAT = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall", "pgscan_direct")


def vmstat() -> dict[str, int]:
    with open("/proc/vmstat") as f:
        pairs = (line.split() for line in f)
        return {k: int(v) for k, v in pairs if k in VMSTAT}


def fill(kind: str, size: int, src: bytes) -> tuple[float, float, int, float]:
    path = "/dev/shm/vmt-fault-probe"
    pre = 0.0
    if kind.startswith("shm"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED)
        os.close(fd)
        os.unlink(path)
        if kind == "shm prefaulted":
            t = time.monotonic()
            m.madvise(MADV_POPULATE_WRITE)
            pre = time.monotonic() - t
    else:
        m = mmap.mmap(-1, size + (2 << 20), mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE if kind == "anon+THP" else mmap.MADV_NOHUGEPAGE)
    view = memoryview(m)
    v0 = vmstat()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.monotonic()
    n = len(src)
    for off in range(0, size, STEP):
        k = off % n
        view[off:off + STEP] = src[k:k + STEP]
    sec = time.monotonic() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    v1 = vmstat()
    delta = " ".join(f"{k}={v1[k] - v0[k]}" for k in VMSTAT if v1[k] - v0[k])
    print(f"  {kind}: /proc/vmstat {delta or '-'}", flush=True)
    view.release()
    m.close()
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return sec, cpu, r1.ru_minflt - r0.ru_minflt, pre


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    src = os.urandom(8 * MIB)
    kinds = ["anon+THP", "anon 4K", "shm shared", "shm prefaulted"]
    res: dict[str, list[tuple[float, float, int, float]]] = {k: [] for k in kinds}
    for rnd in range(args.rounds):
        for kind in kinds[rnd % 4:] + kinds[:rnd % 4]:
            r = fill(kind, args.mib * MIB, src)
            res[kind].append(r)
            print(f"round {rnd + 1} {kind:15} {r[0]:.2f} s, CPU {r[1]:.2f} s, "
                  f"{r[2]} faults, prefault {r[3]:.2f} s", flush=True)
    print("\n| memory | median s | CPU s | faults | prefault s | runs |")
    print("|---|---:|---:|---:|---:|---|")
    for kind in kinds:
        rs = res[kind]
        print(f"| {kind} | {statistics.median(r[0] for r in rs):.2f} | "
              f"{statistics.median(r[1] for r in rs):.2f} | "
              f"{statistics.median(r[2] for r in rs):.0f} | "
              f"{statistics.median(r[3] for r in rs):.2f} | "
              f"{' '.join(f'{r[0]:.2f}' for r in rs)} |")


if __name__ == "__main__":
    main()
