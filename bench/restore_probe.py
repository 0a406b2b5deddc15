#!/usr/bin/env python3
"""Why does libvirt's restore load faster? Load one saved stream into differently set-up
destination QEMUs, changing one thing at a time, in paired rounds.

    .venv/bin/python bench/restore_probe.py [--mem-mib 2048] [--rounds 3] [--qemu PATH]
        [--only NAME,...] [--json FILE]

A source VM of random RAM (the benchmark's shape: memory-backend-file share=on on
/dev/shm, -S) is saved once, as the bare stream, to /dev/shm (tmpfs: no disk in the
way). Every round then restores that stream once into each variant below, in a rotated
order; the time runs from ``migrate-incoming`` until the destination leaves ``inmigrate``
(polled every 5 ms), as in bench.py. Printed: the median, the paired ratio against the
baseline (baseline time / variant time in the same round, median over rounds; > 1 =
faster than the baseline) and how much of the destination's RAM sits in transparent huge
pages after the load (AnonHugePages + ShmemPmdMapped of /proc/PID/smaps_rollup).

Variants (each differs from ``baseline`` in what its name says):
  baseline      bench.py's destination: memory-backend-file share=on on a fresh (sparse)
                /dev/shm file, -machine pc, no -S, exec:cat STREAM (a 64 KiB pipe)
  anon          memory-backend-ram: anonymous memory, which QEMU madvises MADV_HUGEPAGE
                (libvirt's default backend)
  anon-nothp    as anon, QEMU run with prctl(PR_SET_THP_DISABLE): anonymous, 4 KiB pages
  shm-prealloc  as baseline, with prealloc=on (the file's pages are allocated at start-up,
                before migrate-incoming; the start-up cost is printed apart)
  memfd         memory-backend-memfd (shmem, no file name), share=on
  fd-pipe       as baseline, the stream handed over as libvirt does: a pipe grown to
                1 MiB, its read end passed with getfd, migrate-incoming fd:NAME
  fd-pipe-64k   as fd-pipe with the default 64 KiB pipe
  anon-S, anon-sandbox, anon-nodump, anon-misc
                as anon, plus a piece of libvirt's command line (-S; -sandbox; the machine's
                dump-guest-core=off; the rest) — a first bisection, run with --only
  anon-fd, anon-fd-64k
                as fd-pipe and fd-pipe-64k on anonymous memory
  anon-warm     as anon; right before migrate-incoming 2.25 GiB of anonymous memory is
                touched and freed (the memory QEMU then faults in is still host-backed)
  anon-cold     as anon; 8 s idle before migrate-incoming (the guest's free memory has
                been reported to the host by then: virtio-balloon free page reporting)
  baseline-warm as baseline, warmed like anon-warm
  shm-fallocate as baseline; the RAM file fallocate()d before migrate-incoming (its
                pages allocated, not mapped; the time it takes is printed apart)
  shm-fallocate-bg
                as baseline; the same fallocate() in a thread started right after
                migrate-incoming, while QEMU loads
  libvirt-cmd   libvirt 9.0's own command line for the same domain (pc-i440fx-7.2,
                memory-backend-ram, -overcommit, -sandbox, ...) with exec:cat STREAM
                (the sandbox with spawn=allow: libvirt's spawn=deny forbids exec:)
  libvirt-all   libvirt's command line and libvirt's handover (1 MiB pipe, fd:)
Needs root (KVM) and ~3 x MEM of /dev/shm.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from qemuvm import VM, files_equal, make_ram_file  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
F_SETPIPE_SZ = 1031
# Run QEMU with transparent huge pages disabled for the process (inherited over execve).
NOTHP = [sys.executable, "-S", "-I", "-c",
         "import ctypes, os, sys; ctypes.CDLL(None).prctl(41, 1, 0, 0, 0); "
         "os.execv(sys.argv[1], sys.argv[1:])"]  # fmt: skip


@dataclass
class Variant:
    name: str
    backend: str = "shm"  # shm | shm-prealloc | ram | memfd
    handover: str = "exec"  # exec | fd
    pipe_size: int = 1 * MIB  # for fd
    libvirt_cmd: bool = False
    wrapper: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # more QEMU arguments
    machine: str = ""  # more -machine options
    #: right before migrate-incoming: "warm" touches and frees MEM + 256 MiB of
    #: anonymous memory (the guest's free memory then is still backed by the host);
    #: "cold" idles 8 s (long enough for free page reporting to hand it back)
    before: str = ""


VARIANTS = [
    Variant("baseline"),
    Variant("anon", backend="ram"),
    Variant("anon-nothp", backend="ram", wrapper=NOTHP),
    Variant("shm-prealloc", backend="shm-prealloc"),
    Variant("memfd", backend="memfd"),
    Variant("fd-pipe", handover="fd"),
    Variant("fd-pipe-64k", handover="fd", pipe_size=64 << 10),
    Variant("anon-S", backend="ram", extra=["-S"]),
    Variant("anon-sandbox", backend="ram",
            extra=["-sandbox", "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny"]),
    Variant("anon-nodump", backend="ram", machine=",dump-guest-core=off"),
    Variant("anon-misc", backend="ram", machine=",usb=off",
            extra=["-no-user-config", "-overcommit", "mem-lock=off", "-rtc", "base=utc",
                   "-no-shutdown", "-boot", "strict=on", "-msg", "timestamp=on",
                   "-name", "guest=vmtprobe,debug-threads=on"]),
    Variant("anon-fd", backend="ram", handover="fd"),
    Variant("anon-fd-64k", backend="ram", handover="fd", pipe_size=64 << 10),
    Variant("anon-warm", backend="ram", before="warm"),
    Variant("anon-cold", backend="ram", before="cold"),
    Variant("baseline-warm", before="warm"),
    Variant("shm-fallocate", before="fallocate"),
    Variant("shm-fallocate-bg", before="fallocate-bg"),
    Variant("libvirt-cmd", backend="ram", libvirt_cmd=True),
    Variant("libvirt-all", backend="ram", libvirt_cmd=True, handover="fd"),
]


class Dest(VM):
    """A destination QEMU whose memory backend and command line follow a Variant."""

    def __init__(self, qemu: str, workdir: Path, variant: Variant, mem_mib: int,
                 ram_file: Path) -> None:
        super().__init__([*variant.wrapper, qemu], workdir, name="dst", mem_mib=mem_mib,
                         ram_file=ram_file, incoming="defer")
        self.variant = variant

    def args(self) -> list[str]:
        v, mem = self.variant, self.mem_mib
        if v.backend == "ram":
            backend = f"memory-backend-ram,id=mem,size={mem}M"
        elif v.backend == "memfd":
            backend = f"memory-backend-memfd,id=mem,size={mem}M,share=on"
        else:
            backend = f"memory-backend-file,id=mem,size={mem}M,mem-path={self.ram_file},share=on"
            if v.backend == "shm-prealloc":
                backend += ",prealloc=on"
        qmp = ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if not v.libvirt_cmd:
            return [*self.qemu, "-nodefaults", "-display", "none",
                    "-machine", f"pc,accel=kvm,memory-backend=mem{v.machine}",
                    "-object", backend, "-m", f"{mem}M", *qmp, *v.extra,
                    "-incoming", "defer"]  # fmt: skip
        # The sandbox's spawn=deny would kill QEMU (SIGSYS) when exec: forks.
        spawn = "allow" if v.handover == "exec" else "deny"
        # What libvirt 9.0 ran for the domain bench.py's virsh contenders define (from
        # /var/log/libvirt/qemu/NAME.log), minus its secret object and monitor fd.
        return [*self.qemu, "-name", "guest=vmtprobe,debug-threads=on", "-S",
                "-machine", "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=mem",
                "-accel", "kvm", "-cpu", "qemu64", "-m", f"{mem}", "-object", backend,
                "-overcommit", "mem-lock=off", "-smp", "1,sockets=1,cores=1,threads=1",
                "-display", "none", "-no-user-config", "-nodefaults", *qmp,
                "-rtc", "base=utc", "-no-shutdown", "-boot", "strict=on",
                "-incoming", "defer", "-sandbox",
                f"on,obsolete=deny,elevateprivileges=deny,spawn={spawn},resourcecontrol=deny",
                "-msg", "timestamp=on"]  # fmt: skip


def allocate(path: Path) -> None:
    """Allocate every page of the (tmpfs) RAM file without writing it: fallocate."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def warm(mib: int) -> None:
    """Touch ``mib`` MiB of fresh anonymous memory, then free it."""
    m = mmap.mmap(-1, mib * MIB, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    m.madvise(23)  # MADV_POPULATE_WRITE
    m.close()


def thp_mib(pid: int) -> int:
    kib = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("AnonHugePages", "ShmemPmdMapped", "FilePmdMapped"):
                kib += int(rest.split()[0])
    return kib >> 10


def proc_stat(pid: int) -> tuple[float, int]:
    """(user+system CPU seconds, minor faults) of all of ``pid``'s threads so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[7])


@dataclass
class Run:
    seconds: float
    startup: float
    thp_mib: int
    cpu: float = 0.0  # QEMU's CPU seconds during the load
    faults: int = 0  # QEMU's minor page faults during the load
    pre: float = 0.0  # seconds spent before migrate-incoming (fallocate)


def restore(qemu: str, work: Path, stream: Path, v: Variant, mem: int,
            verify: Path | None) -> Run:
    dst_ram = Path("/dev/shm/vmtprobe-dst.ram")
    dst_ram.unlink(missing_ok=True)
    make_ram_file(dst_ram, mem, random=False)
    t0 = time.monotonic()
    with Dest(qemu, work, v, mem, dst_ram) as vm:
        startup = time.monotonic() - t0
        vm.cmd("migrate-set-capabilities",
               {"capabilities": [{"capability": "events", "state": True}]})
        feeder: subprocess.Popen[bytes] | None = None
        if v.handover == "fd":
            r, w = os.pipe2(os.O_CLOEXEC)
            fcntl.fcntl(r, F_SETPIPE_SZ, v.pipe_size)
            feeder = subprocess.Popen(["cat", str(stream)], stdout=w)
            os.close(w)
            vm.qmp.send_fd(r, "migfd")
            os.close(r)
            uri = "fd:migfd"
        else:
            uri = f"exec:cat {stream}"
        pre = 0.0
        background: threading.Thread | None = None
        if v.before == "warm":
            warm(mem + 256)
        elif v.before == "cold":
            time.sleep(8)
        elif v.before == "fallocate":
            t = time.monotonic()
            allocate(dst_ram)
            pre = time.monotonic() - t
        elif v.before == "fallocate-bg":
            background = threading.Thread(target=allocate, args=(dst_ram,))
        cpu0, flt0 = proc_stat(vm.pid)
        t = time.monotonic()
        vm.cmd("migrate-incoming", {"uri": uri})
        if background is not None:
            background.start()
        status = vm.wait_incoming(timeout=600, poll=0.005)
        if background is not None:
            background.join()
        seconds = time.monotonic() - t
        cpu1, flt1 = proc_stat(vm.pid)
        if status not in ("prelaunch", "paused"):
            raise SystemExit(f"{v.name}: destination {status} after the load:\n{vm.log()}")
        thp = thp_mib(vm.pid)
        if feeder is not None:
            feeder.wait()
        if verify is not None and v.backend in ("shm", "shm-prealloc"):
            if not files_equal(verify, dst_ram):
                raise SystemExit(f"{v.name}: destination RAM differs from the source's")
    dst_ram.unlink(missing_ok=True)
    return Run(seconds, startup, thp, cpu1 - cpu0, flt1 - flt0, pre)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mem-mib", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--qemu", default="/usr/bin/qemu-system-x86_64")
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - {v.name for v in VARIANTS}
    if unknown:
        ap.error(f"--only: unknown variant(s) {', '.join(sorted(unknown))}")
    variants = [v for v in VARIANTS if not names or v.name in names or v.name == "baseline"]
    mem = args.mem_mib
    work = Path("/dev/shm/vmtprobe")
    work.mkdir(exist_ok=True)
    src_ram = Path("/dev/shm/vmtprobe-src.ram")
    stream = Path("/dev/shm/vmtprobe.stream")
    make_ram_file(src_ram, mem, random=True)
    with VM(args.qemu, work, name="src", mem_mib=mem, ram_file=src_ram, paused=True) as vm:
        vm.migrate(f"exec:cat > {stream}")
        info = vm.wait_migration(timeout=600)
        if info.get("status") != "completed":
            raise SystemExit(f"source save failed: {info}")
    print(f"stream: {stream.stat().st_size / GIB:.2f} GiB; QEMU {args.qemu}", flush=True)
    runs: dict[str, list[Run]] = {v.name: [] for v in variants}
    for rnd in range(args.rounds):
        order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
        for v in order:
            r = restore(args.qemu, work, stream, v, mem, src_ram if rnd == 0 else None)
            runs[v.name].append(r)
            print(f"round {rnd + 1} {v.name:13} {r.seconds:6.2f} s  "
                  f"(QEMU CPU {r.cpu:.2f} s, {r.faults} faults; start-up {r.startup:.2f} s, "
                  f"before {r.pre:.2f} s, "
                  f"THP {r.thp_mib} MiB)", flush=True)
    base = runs["baseline"]
    print("\n| variant | median s | GiB/s | paired baseline/this | QEMU CPU s | faults "
          "| start-up s | THP MiB | runs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for v in variants:
        rs = runs[v.name]
        med = statistics.median(r.seconds for r in rs)
        paired = statistics.median(b.seconds / r.seconds for b, r in zip(base, rs, strict=True))
        print(f"| {v.name} | {med:.2f} | {stream.stat().st_size / GIB / med:.2f} | "
              f"{paired:.2f} | {statistics.median(r.cpu for r in rs):.2f} | "
              f"{statistics.median(r.faults for r in rs):.0f} | "
              f"{statistics.median(r.startup for r in rs):.2f} | "
              f"{rs[-1].thp_mib} | {' '.join(f'{r.seconds:.2f}' for r in rs)} |")
    if args.json:
        args.json.write_text(json.dumps({k: [r.__dict__ for r in rs] for k, rs in runs.items()},
                                        indent=1))
    stream.unlink(missing_ok=True)
    src_ram.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
