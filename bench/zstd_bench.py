#!/usr/bin/env python3
"""Compressed saves: vmtransport's ``zstd:`` plugin against the uncompressed ``odirect:``
save and libvirt's way, on a VM whose RAM is half zeros, a quarter text and a quarter
random bytes.

    .venv/bin/python bench/zstd_bench.py [--mem-mib 1024] [--rounds 3] [--qemu 7.2]
        [--level 3] [--json FILE]

Contenders, in every round (paired: each round runs them all, back to back, starting
one later than the round before), with bench/bench.py's method (images evicted from the
page cache before each run; save: QEMU's total-time; restore: from migrate-incoming
until the destination leaves ``inmigrate``, into anonymous RAM that is compared with the
source afterwards; helper CPU seconds (user+sys of the helper and its children) via
/usr/bin/time):

save     ``vmtransport save odirect:``, ``vmtransport save zstd,level=L:odirect:`` (the
         plugin; threads: the CPUs here), libvirt's way: ``zstd -c`` (single-threaded,
         level 3, what libvirt runs for ``save_image_format = "zstd"``) piped into
         ``libvirt_iohelper`` writing with O_DIRECT (``--bypass-cache``), and plain
         ``exec:zstd -c > FILE`` (through the page cache, not synced).
restore  the same images back: ``vmtransport restore odirect:`` and ``zstd:odirect:``,
         ``libvirt_iohelper`` (O_DIRECT) piped into ``zstd -dc``, and ``zstd -dc FILE``.

libvirtd itself is not driven (bench/bench.py's ``virsh`` rows do that for the
uncompressed format). Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from qemuvm import find_qemus  # noqa: E402

import bench  # noqa: E402
from bench import IOHELPER, LIMITS, VMT, Contender, Run, median, timed  # noqa: E402

MIB = 1 << 20


def make_ram(path: Path, mib: int) -> None:
    """Half zeros, a quarter text (words drawn from a vocabulary, no 4 KiB page twice:
    16 MiB of it, then rotated by odd amounts), a quarter random bytes."""
    rng = random.Random(15)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 10)))
             for _ in range(5000)]  # fmt: skip
    text = bytearray()
    n = 0
    while len(text) < 16 * MIB:
        words = rng.choices(vocab, k=4096)
        text += (f"{n:08d} " + " ".join(words) + ".\n").encode()
        n += 1
    base = bytes(text[: 16 * MIB])
    quarter = mib // 4 * MIB
    with open(path, "wb") as f:
        written, k = 0, 0
        while written < quarter:
            r = (k * 4099) % len(base)
            piece = (base[r:] + base[:r])[: quarter - written]
            f.write(piece)
            written += len(piece)
            k += 1
        seed = os.urandom(16 * MIB)
        written, k = 0, 0
        while written < quarter:
            r = (k * 4097) % len(seed)
            piece = (seed[r:] + seed[:r])[: quarter - written]
            f.write(piece)
            written += len(piece)
            k += 1
        f.truncate(mib * MIB)  # the rest: zeros


def contenders(level: int) -> tuple[list[Contender], list[Contender]]:
    zuri = f"zstd,level={level}:odirect:"
    saves = [
        Contender("vmtransport save odirect:",
                  lambda i, c: timed(f"{VMT} save odirect:{i}", c), image="img-plain"),
        Contender(f"vmtransport save {zuri}",
                  lambda i, c: timed(f"{VMT} save {zuri}{i}", c), image="img-zstd"),
        Contender("libvirt: zstd -c, then iohelper (O_DIRECT)",
                  lambda i, c: timed(
                      f"sh -c 'zstd -q -c | {LIMITS} odirect-exec w {i} {IOHELPER} {i} {{fd}}'",
                      c), image="img-lvzstd"),
        Contender("exec:zstd -c > FILE",
                  lambda i, c: timed(f"sh -c 'zstd -q -c > {i}'", c), image="img-zstdc"),
    ]  # fmt: skip
    restores = [
        Contender("vmtransport restore odirect:",
                  lambda i, c: timed(f"{VMT} restore odirect:{i}", c), image="img-plain"),
        Contender(f"vmtransport restore {zuri}",
                  lambda i, c: timed(f"{VMT} restore zstd:odirect:{i}", c), image="img-zstd"),
        Contender("libvirt: iohelper (O_DIRECT), then zstd -dc",
                  lambda i, c: timed(
                      f"sh -c '{LIMITS} odirect-exec r {i} {IOHELPER} {i} {{fd}} | zstd -q -dc'",
                      c), image="img-lvzstd"),
        Contender("exec:zstd -dc FILE",
                  lambda i, c: timed(f"zstd -q -dc {i}", c), image="img-zstdc"),
    ]  # fmt: skip
    return saves, restores


def rows(
    runs: dict[str, list[Run]],
    sizes: dict[str, list[int]],
    mem: int,
    base: str,
    libvirt: str,
    stream: int,
) -> list[str]:
    gib = mem / 1024
    out = ["| contender | median s | GiB/s (RAM) | odirect: / this | libvirt / this "
           "| helper CPU s | CPU s per GiB RAM | image MiB | size / odirect: image | runs |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, rs in runs.items():
        sec = median([r.seconds for r in rs])
        cpu = median([r.cpu for r in rs])
        assert sec is not None
        vs_base = median([a.seconds / b.seconds for a, b in zip(runs[base], rs, strict=True)])
        vs_lv = median([a.seconds / b.seconds for a, b in zip(runs[libvirt], rs, strict=True)])
        size = max(sizes[name]) if sizes.get(name) else 0
        out.append(
            f"| {name} | {sec:.2f} | {gib / sec:.2f} | {vs_base:.2f} | {vs_lv:.2f} | "
            f"{'n/a' if cpu is None else f'{cpu:.2f}'} | "
            f"{'n/a' if cpu is None else f'{cpu / gib:.2f}'} | {size / MIB:.1f} | "
            f"{size / stream:.3f} | {' '.join(f'{r.seconds:.2f}' for r in rs)} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--qemu", default="7.2")
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp/vmtransport-zstd-bench")
    ap.add_argument("--json")
    args = ap.parse_args()
    qemu = find_qemus()[args.qemu]
    mem = args.mem_mib
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src_ram = Path("/dev/shm/vmtbench-zstd-src.ram")
    make_ram(src_ram, mem)
    saves, restores = contenders(args.level)
    save_runs: dict[str, list[Run]] = {c.name: [] for c in saves}
    restore_runs: dict[str, list[Run]] = {c.name: [] for c in restores}
    sizes: dict[str, list[int]] = {c.name: [] for c in saves}
    try:
        for rnd in range(args.rounds):
            bench.clear_images(work)
            for c in bench.rotated(saves, rnd):
                r = bench.run_save(qemu, work, src_ram, mem, c)
                save_runs[c.name].append(r)
                sizes[c.name].append((work / str(c.image)).stat().st_size)
                print(f"round {rnd}: {c.name}: {r.seconds:.2f} s, cpu {r.cpu}", flush=True)
            os.sync()
            time.sleep(5)
            for c in bench.rotated(restores, rnd):
                r = bench.run_restore(qemu, work, src_ram, mem, c, verify=True)
                restore_runs[c.name].append(r)
                print(f"round {rnd}: {c.name}: {r.seconds:.2f} s, cpu {r.cpu}", flush=True)
    finally:
        src_ram.unlink(missing_ok=True)
    plain = max(sizes[saves[0].name])
    restore_sizes = {r.name: sizes[s.name] for s, r in zip(saves, restores, strict=True)}
    report = [
        f"## zstd: QEMU {args.qemu}, {mem} MiB RAM (1/2 zeros, 1/4 text, 1/4 random), "
        f"{args.rounds} rounds, {os.cpu_count()} CPUs, level {args.level}",
        "",
        "### save",
        "",
        *rows(save_runs, sizes, mem, saves[0].name, saves[2].name, plain),
        "",
        "### restore",
        "",
        *rows(restore_runs, restore_sizes, mem, restores[0].name, restores[2].name, plain),
    ]
    print("\n".join(report))
    if args.json:
        doc = {
            "qemu": args.qemu, "mem_mib": mem, "rounds": args.rounds, "level": args.level,
            "sizes": sizes,
            "save": {k: [vars(r) for r in v] for k, v in save_runs.items()},
            "restore": {k: [vars(r) for r in v] for k, v in restore_runs.items()},
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
