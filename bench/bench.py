#!/usr/bin/env python3
"""Save and restore a real VM of random RAM through vmtransport and the alternatives.

    .venv/bin/python bench/bench.py [--mem-mib 2048] [--rounds 3] [--qemu 7.2,10.0]
        [--only STR,...] [--saves-only] [--variant NAME=PATH[:ENV=VAL,...]]... [--json FILE]
        [--dst-memory anon|shm] [--dst-history warm|cold|as-is] [--no-virsh]

Per QEMU version, every round runs each contender once, in turn (alternating, so drift
hits all alike; each round starts one contender later than the one before, and the
restores start 10 s after the saves), with the images cold before each run: every file
in the work directory is synced and evicted from the page cache (POSIX_FADV_DONTNEED,
checked with mincore). The programs stay cached, as on a host that saves and restores
routinely; with ``--drop-caches`` the whole page cache is dropped instead, and each
helper also loads its own code from disk (a first run after boot: ~0.1 s more for a
Python helper here).

Images: vmtransport's contenders write and read vmtransport images (the default: a
64 KiB header, then the stream, checksummed); the others write and read the bare stream.

save:    the producer's limit (a 1 MiB-pipe discard sink), vmtransport odirect: and
         file:, ``exec:cat > FILE``, libvirt_iohelper with an O_DIRECT fd, and on QEMU
         >= 10 native ``file:`` and ``file:`` + mapped-ram + multifd + direct-io.
         Also ``vmtransport save --qmp SOCKET odirect:IMG --after pause``: vmtransport
         drives the paused source over a second QMP socket (fd: pipe), timed like the
         others by QEMU's total-time, and its wall time from the command to its exit
         goes to --json ("wall") and under the table. (total-time starts at ``migrate``:
         for an exec: helper that includes its start-up, which QEMU forks then; for
         --qmp, vmtransport's start-up and QMP set-up come before, so only the wall
         time counts them.)
restore: the consumer's limit (the image on tmpfs, spliced into a 1 MiB pipe),
         vmtransport odirect: and file:, ``exec:cat FILE``, ``dd iflag=direct``,
         libvirt_iohelper with an O_DIRECT fd, and QEMU's native file: loads. Also
         ``vmtransport restore --qmp SOCKET odirect:IMG --paused`` into the same
         destination (``-incoming defer`` plus a second QMP socket), reading the --qmp
         save's image, timed from the command until the destination leaves
         ``inmigrate`` (its wall time to its exit goes to --json).
variants (``--variant NAME=PATH[:ENV=VAL,...]``, repeatable): other vmtransports — a
         checkout (its .venv's console script, or this interpreter with the checkout
         first on PYTHONPATH), a virtualenv, a venv's python, or any executable that
         runs vmtransport's CLI — run with these environment variables, as contenders
         "variant NAME: save odirect:" and "variant NAME: restore odirect:" in every
         round (``--variant-schemes odirect,file`` for file: too). Each restores the image
         its own save wrote. With two or more, a table per direction compares them with
         the first, paired per round. ``--only variant`` leaves out the built-in rows
         (the limits, disk alone and, for restores, cat's bare stream still run).
virsh:   ``virsh save --bypass-cache`` and ``virsh restore --bypass-cache --paused`` of a
         real libvirtd (Debian's libvirt-daemon-system; started here without systemd if
         none runs, and stopped again; see bench/virsh.py), on the system's QEMU only,
         timed from the command until it returns; left out, with the reason printed,
         when libvirt is not installed or --no-virsh.
destinations: a restore's destination QEMU has anonymous RAM (``--dst-memory anon``,
         as libvirt's domains) or a shared file on /dev/shm (``shm``, the source's shape:
         4 KiB pages, ~2x slower to load); before it starts, MEM + 256 MiB of anonymous
         memory is touched and freed (``--dst-history warm``) so that every destination
         faults in memory of the same history (see docs/performance.md, "Why libvirt's
         restore loads faster").
both:    "disk alone" (no QEMU, always run, like the limits): the image's size written
         or read with O_DIRECT in 8 MiB requests from huge-page-backed memory, several
         in flight — what the disk itself does in that round. When it is slower than a
         limit, no contender that goes through the disk can reach that limit.

Printed per contender: median seconds (save: QEMU's total-time; restore: from
migrate-incoming until the destination leaves ``inmigrate``), throughput, the ratio of
the limit's time to the contender's (1.0 = as fast as the limit), "reachable / this": the
same per round against the slower of the limit and the disk alone (what a contender that
goes through this disk can reach in that round, paired), the CPU seconds of the
helper process (user+sys, via /usr/bin/time; n/a for QEMU-native paths) and how much of
the image sits in the page cache afterwards (mincore). RAM files live on /dev/shm so
that only the image touches the disk. Needs root.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import virsh  # noqa: E402
from qemuvm import VM, files_equal, find_qemus, make_ram_file, qemu_version  # noqa: E402

from vmtransport.testing import cached_bytes  # noqa: E402

# The interpreter itself, not a pyenv shim: -S -I keeps its start-up near 30 ms.
LIMITS = f"{sys.executable} -S -I {HERE / 'limits.py'}"
IOHELPER = "/usr/lib/libvirt/libvirt_iohelper"
VMT = str(Path(sys.executable).parent / "vmtransport")
GIB = 1 << 30


@dataclass
class Contender:
    name: str
    uri: Callable[[Path, Path], str]  # (image, cpu-time file) -> migration URI
    image: str | None = "img"  # which image file it writes/reads (None: none)
    min_qemu: int = 7
    caps: dict[str, bool] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    helper: bool = True  # runs a helper process whose CPU time we measure
    limit: bool = False
    #: no QEMU: a command run on its own, timed from start to exit (image, MiB) -> argv
    alone: Callable[[Path, int], list[str]] | None = None
    #: through libvirtd: `virsh save/restore --bypass-cache`, timed from the command to
    #: its return (bench/virsh.py); only on the QEMU libvirt drives (the system's)
    virsh: bool = False
    #: vmtransport drives QEMU over a second QMP socket: (image, socket) -> argv, run
    #: under /usr/bin/time instead of a migration URI (uri is unused)
    qmp: Callable[[Path, str], list[str]] | None = None


def timed(cmd: str, cpu: Path) -> str:
    return f"exec:/usr/bin/time -f '%U %S' -o {cpu} {cmd}"


def time_argv(cpu: Path) -> list[str]:
    """What ``timed`` puts before an exec: helper, for a command the bench runs itself."""
    return ["/usr/bin/time", "-f", "%U %S", "-o", str(cpu)]


MAPPED = {"mapped-ram": True, "multifd": True}
MAPPED_PARAMS = {"multifd-channels": 2, "direct-io": True}

SAVES = [
    Contender("limit: 1 MiB-pipe discard", lambda i, c: timed(f"{LIMITS} discard", c),
              image=None, limit=True),
    Contender("vmtransport save odirect:", lambda i, c: timed(f"{VMT} save odirect:{i}", c)),
    Contender("vmtransport save file:", lambda i, c: timed(f"{VMT} save file:{i}", c),
              image="img-file"),
    Contender("vmtransport save --qmp odirect:", lambda i, c: "", image="img-qmp",
              qmp=lambda i, s: [VMT, "save", "--qmp", s, f"odirect:{i}", "--after", "pause",
                                "--no-progress"]),
    Contender("exec:cat > FILE", lambda i, c: timed(f"sh -c 'cat > {i}'", c), image="img-cat"),
    Contender("libvirt_iohelper (O_DIRECT)",
              lambda i, c: timed(f"{LIMITS} odirect-exec w {i} {IOHELPER} {i} {{fd}}", c),
              image="img-iohelper"),
    Contender("QEMU native file:", lambda i, c: f"file:{i}", image="img-native", min_qemu=10,
              helper=False),
    Contender("QEMU file: mapped-ram+multifd(2)+direct-io", lambda i, c: f"file:{i}",
              image="img-mapped", min_qemu=10, caps=MAPPED, params=MAPPED_PARAMS,
              helper=False),
    Contender("virsh save --bypass-cache", lambda i, c: "", image="img-virsh", helper=False,
              virsh=True),
    Contender("disk alone: O_DIRECT write, no QEMU", lambda i, c: "", image="img-disk",
              helper=False, alone=lambda i, mib: [*LIMITS.split(), "disk-write", str(i),
                                                  str((mib << 20) + (4 << 20))]),
]  # fmt: skip

RESTORES = [
    Contender("limit: tmpfs image, 1 MiB-pipe splice",
              lambda i, c: timed(f"{LIMITS} serve /dev/shm/vmtbench-img", c), image=None,
              limit=True),
    Contender("vmtransport restore odirect:",
              lambda i, c: timed(f"{VMT} restore odirect:{i}", c)),
    Contender("vmtransport restore file:", lambda i, c: timed(f"{VMT} restore file:{i}", c),
              image="img-file"),
    # --paused: as virsh restore's; the source was paused, so the image says so anyway
    Contender("vmtransport restore --qmp odirect:", lambda i, c: "", image="img-qmp",
              qmp=lambda i, s: [VMT, "restore", "--qmp", s, f"odirect:{i}", "--paused",
                                "--no-progress"]),
    Contender("exec:cat FILE", lambda i, c: timed(f"cat {i}", c), image="img-cat"),
    Contender("dd iflag=direct bs=1M",
              lambda i, c: timed(f"dd if={i} iflag=direct bs=1M status=none", c),
              image="img-cat"),
    Contender("libvirt_iohelper (O_DIRECT)",
              lambda i, c: timed(f"{LIMITS} odirect-exec r {i} {IOHELPER} {i} {{fd}}", c),
              image="img-iohelper"),
    Contender("QEMU native file:", lambda i, c: f"file:{i}", image="img-native", min_qemu=10,
              helper=False),
    Contender("QEMU file: mapped-ram+multifd(2)+direct-io", lambda i, c: f"file:{i}",
              image="img-mapped", min_qemu=10, caps=MAPPED, params=MAPPED_PARAMS,
              helper=False),
    Contender("virsh restore --bypass-cache", lambda i, c: "", image="img-virsh",
              helper=False, virsh=True),
    Contender("disk alone: O_DIRECT read, no QEMU", lambda i, c: "", image="img-disk",
              helper=False, alone=lambda i, mib: [*LIMITS.split(), "disk-read", str(i)]),
]  # fmt: skip


#: How a checkout without a virtualenv is run: what the console script does.
LAUNCH = "import sys; from vmtransport._main import main; sys.exit(main())"


@dataclass
class Variant:
    """Another vmtransport to compare in the same rounds (``--variant``): a command that
    runs it, and environment variables to run it with."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def command(self, *args: str) -> str:
        """The shell command (QEMU's exec: runs it through /bin/sh) that runs ``args``."""
        env = [f"{k}={v}" for k, v in self.env.items()]
        return shlex.join([*(["env", *env] if env else []), *self.argv, *args])


def variant_argv(path: Path) -> tuple[list[str], dict[str, str]]:
    """The command that runs the vmtransport at ``path``: a checkout (its .venv's console
    script, or this interpreter with the checkout first on PYTHONPATH), a virtualenv, a
    venv's python (its console script beside it) or any executable."""
    if path.is_dir():
        for script in (path / ".venv/bin/vmtransport", path / "bin/vmtransport"):
            if script.is_file():
                return [str(script)], {}
        if (path / "vmtransport/__init__.py").is_file():
            return [sys.executable, "-P", "-c", LAUNCH], {"PYTHONPATH": str(path)}
        raise ValueError(f"{path}: neither a checkout of vmtransport nor a virtualenv")
    if path.name.startswith("python") and os.access(path, os.X_OK):
        script = path.parent / "vmtransport"
        return ([str(script)] if script.is_file() else [str(path), "-P", "-c", LAUNCH]), {}
    if path.is_file() and os.access(path, os.X_OK):
        return [str(path)], {}
    raise ValueError(f"{path}: not a directory or an executable")


def parse_variant(spec: str) -> Variant:
    """``NAME=PATH[:ENV=VAL,...]`` (see --variant)."""
    name, eq, rest = spec.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise ValueError(f"--variant {spec!r}: expected NAME=PATH[:ENV=VAL,...], NAME of "
                         "letters, digits and _.+-")
    path, _, envs = rest.partition(":")
    if not path:
        raise ValueError(f"--variant {spec!r}: no path")
    env: dict[str, str] = {}
    for item in filter(None, envs.split(",")):
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--variant {spec!r}: {item!r} is not ENV=VAL")
        env[key] = val
    try:
        argv, implied = variant_argv(Path(os.path.abspath(os.path.expanduser(path))))
    except ValueError as exc:
        raise ValueError(f"--variant {spec!r}: {exc}") from None
    return Variant(name, argv, {**implied, **env})


def variant_contenders(variants: list[Variant], schemes: list[str]) -> tuple[
        list[Contender], list[Contender]]:
    """Each variant's save and restore per scheme; a restore reads its own save's image."""
    saves, restores = [], []
    for v in variants:
        for scheme in schemes:
            image = f"img-v-{v.name}-{scheme}"
            saves.append(Contender(f"variant {v.name}: save {scheme}:",
                                   _variant_uri(v, "save", scheme), image=image))
            restores.append(Contender(f"variant {v.name}: restore {scheme}:",
                                      _variant_uri(v, "restore", scheme), image=image))
    return saves, restores


def _variant_uri(v: Variant, command: str, scheme: str) -> Callable[[Path, Path], str]:
    return lambda image, cpu: timed(v.command(command, f"{scheme}:{image}"), cpu)


def run_alone(work: Path, mem: int, c: Contender) -> Run:
    """A reference without QEMU: what the disk does on its own in the same round."""
    import subprocess

    assert c.alone is not None
    image = work / (c.image or "img-disk")
    cold_images(work)
    start = time.monotonic()
    subprocess.run(c.alone(image, mem), check=True)
    return Run(time.monotonic() - start, None, residency(image))


@dataclass
class Run:
    seconds: float
    cpu: float | None
    cached: float | None  # fraction of the image in the page cache afterwards
    wall: float | None = None  # --qmp contenders: from the command to its exit


def qmp_socket(name: str) -> str:
    """A second QMP socket for vmtransport (the bench's client holds the VM's first;
    QEMU serves one client per socket); short, outside --dir (107-byte limit)."""
    return f"/tmp/vmtbench-{name}-{os.getpid()}.sock"


def qmp_args(c: Contender, sock: str) -> list[str]:
    return ["-qmp", f"unix:{sock},server=on,wait=off"] if c.qmp else []


def helper_failed(c: Contender, rc: int, err: Path) -> RuntimeError:
    text = err.read_text(errors="replace").strip() if err.exists() else ""
    return RuntimeError(f"{c.name}: exit status {rc}: {text}")


SETTLE_S = 10


def clear_images(work: Path) -> None:
    """Remove a round's images, then let the filesystem settle: on ext4 mounted with
    ``discard`` (as here) freeing GiBs of blocks sends discards that would slow down
    whichever contender writes next."""
    for p in work.glob("img*"):
        p.unlink()
    os.sync()
    time.sleep(3)


#: set by --drop-caches: drop the whole page cache before each run, not just the images
DROP_ALL = False


def cold_images(work: Path) -> None:
    """Before a run: no image's pages in the page cache (see the module's docstring)."""
    os.sync()
    if DROP_ALL:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    for p in work.iterdir():
        if not p.is_file():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        cached = residency(p) if p.name.startswith("img") else 0
        if cached:  # (pages someone maps or dirties again cannot be evicted)
            raise RuntimeError(f"{p}: {cached:.1%} still cached after eviction")


def read_cpu(path: Path) -> float | None:
    try:
        user, sys_ = path.read_text().split()[-2:]
        return float(user) + float(sys_)
    except (OSError, ValueError):
        return None


def residency(path: Path) -> float | None:
    if not path.exists():
        return None
    cached, size = cached_bytes(path)
    return cached / size if size else 0.0


def set_caps(vm: VM, c: Contender) -> None:
    caps = {"events": True, **c.caps}
    vm.cmd("migrate-set-capabilities",
           {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]})
    vm.cmd("migrate-set-parameters", {"max-bandwidth": 100 * GIB, **c.params})


class AnonVM(VM):
    """A destination whose RAM is anonymous memory (``memory-backend-ram``), as libvirt's
    default: QEMU madvises it MADV_HUGEPAGE, so the load faults in 2 MiB pages, where
    a shared file on /dev/shm (shmem, huge pages off by default) takes 4 KiB faults —
    see docs/performance.md, "Why libvirt's restore loads faster"."""

    def args(self) -> list[str]:
        ram = f"memory-backend-ram,id=mem,size={self.mem_mib}M"
        return [ram if a.startswith("memory-backend-file,") else a for a in super().args()]


#: set by --dst-memory: "anon" (AnonVM) or "shm" (VM: a shared file on /dev/shm)
DST_MEMORY = "anon"
DST_MEMORY_TEXT = {"anon": "anonymous (memory-backend-ram, as libvirt's)",
                   "shm": "a shared file on /dev/shm (memory-backend-file,share=on)"}
#: why the virsh contenders cannot run (set in main), None when they can
VIRSH_SKIP: str | None = None


def run_virsh_save(work: Path, src_ram: Path, mem: int, c: Contender, qemu: str) -> Run:
    image = work / (c.image or "img-virsh")
    virsh.start_source(qemu, mem, src_ram, work)
    cold_images(work)
    seconds = virsh.save(image)  # the transient domain is gone afterwards
    return Run(seconds, None, residency(image))


#: set by --dst-history: what the memory a restore's destination gets has been doing
DST_HISTORY = "warm"
#: free page reporting hands free memory back to the hypervisor in ~2 s; wait longer
COLD_S = 8


def dst_history(mem: int) -> None:
    """Give every restore's destination memory of the same history, right before it
    starts. On this machine (a guest whose balloon reports free memory to the host) the
    first touch of memory freed > ~2 s earlier costs the host's faults too: a load into
    anonymous memory took 1.5-2.0 s warm against 3.4-4.3 s cold (docs/performance.md,
    "Why libvirt's restore loads faster"); otherwise it depends on what ran before.
    warm: touch and free MEM + 256 MiB of anonymous memory (huge pages); cold: idle."""
    if DST_HISTORY == "warm":
        m = mmap.mmap(-1, (mem + 256) << 20, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
        m.madvise(MADV_POPULATE_WRITE)
        m.close()
    elif DST_HISTORY == "cold":
        time.sleep(COLD_S)


MADV_POPULATE_WRITE = 23


def run_virsh_restore(work: Path, src_ram: Path, mem: int, c: Contender,
                      verify: bool) -> Run:
    image = work / (c.image or "img-virsh")
    cold_images(work)
    dst_history(mem)
    try:
        seconds = virsh.restore(image)
        if verify and not virsh.copy_ram(virsh.qemu_pid(), src_ram, into_guest=False):
            raise RuntimeError(f"{c.name}: restored RAM differs from the source")
    finally:
        virsh.destroy()
    return Run(seconds, None, residency(image))


def run_save(qemu: str, work: Path, src_ram: Path, mem: int, c: Contender) -> Run:
    if c.alone is not None:
        return run_alone(work, mem, c)
    if c.virsh:
        return run_virsh_save(work, src_ram, mem, c, qemu)
    image = work / (c.image or "none")
    cpu = work / "cpu"
    assert not image.exists(), "images are removed between rounds (see clear_images)"
    cpu.unlink(missing_ok=True)
    sock = qmp_socket("src")
    err = work / "helper.err"
    helper_wall = None
    with VM(qemu, work, name="src", mem_mib=mem, ram_file=src_ram, paused=True,
            extra_args=qmp_args(c, sock)) as vm:
        cold_images(work)
        set_caps(vm, c)
        start = time.monotonic()
        if c.qmp is not None:
            import subprocess

            with open(err, "wb") as f:
                rc = subprocess.run([*time_argv(cpu), *c.qmp(image, sock)], timeout=600,
                                    stdin=subprocess.DEVNULL, stdout=f, stderr=f).returncode
            helper_wall = time.monotonic() - start
            if rc != 0:
                raise helper_failed(c, rc, err)
        else:
            vm.cmd("migrate", {"uri": c.uri(image, cpu)})
        info = vm.wait_migration(timeout=600, poll=0.01)
        wall = time.monotonic() - start
        if info["status"] != "completed":
            raise RuntimeError(f"{c.name}: migration {info['status']}: {info.get('error-desc')}"
                               f"\n--- {vm.log_path} ---\n{vm.log()}")
        # QEMU 7.2 can answer "completed" before it has stored total-time: ask again.
        time.sleep(0.02)
        seconds = vm.query_migrate().get("total-time", 0) / 1000 or wall
    Path(sock).unlink(missing_ok=True)
    time.sleep(0.05)  # the helper writes its CPU time as it exits
    return Run(seconds, read_cpu(cpu) if c.helper else None,
               residency(image) if c.image else None, helper_wall)


def run_restore(qemu: str, work: Path, src_ram: Path, mem: int, c: Contender,
                verify: bool) -> Run:
    if c.alone is not None:
        return run_alone(work, mem, c)
    if c.virsh:
        return run_virsh_restore(work, src_ram, mem, c, verify)
    image = work / (c.image or "img")
    cpu = work / "cpu"
    cpu.unlink(missing_ok=True)
    dst_ram = Path("/dev/shm/vmtbench-dst.ram")
    dst_ram.unlink(missing_ok=True)
    make_ram_file(dst_ram, mem, random=False)
    anon = DST_MEMORY == "anon"
    cold_images(work)
    dst_history(mem)
    sock = qmp_socket("dst")
    helper_wall = None
    with (AnonVM if anon else VM)(qemu, work, name="dst", mem_mib=mem, ram_file=dst_ram,
                                  incoming="defer", extra_args=qmp_args(c, sock)) as vm:
        set_caps(vm, c)
        start = time.monotonic()
        if c.qmp is not None:
            status, seconds, helper_wall = qmp_restore(vm, c, image, sock, work, cpu, start)
        else:
            vm.cmd("migrate-incoming", {"uri": c.uri(image, cpu)})
            status = vm.wait_incoming(timeout=600, poll=0.005)
            seconds = time.monotonic() - start
        if status not in ("prelaunch", "paused", "running"):
            raise RuntimeError(f"{c.name}: destination ended {status}")
        if verify and anon and not virsh.copy_ram(vm.pid, src_ram, into_guest=False):
            raise RuntimeError(f"{c.name}: restored RAM differs from the source")
    time.sleep(0.05)
    if verify and not anon and not files_equal(src_ram, dst_ram):
        raise RuntimeError(f"{c.name}: restored RAM differs from the source")
    dst_ram.unlink(missing_ok=True)
    Path(sock).unlink(missing_ok=True)
    return Run(seconds, read_cpu(cpu) if c.helper else None, residency(image), helper_wall)


def qmp_restore(vm: VM, c: Contender, image: Path, sock: str, work: Path, cpu: Path,
                start: float) -> tuple[str, float, float]:
    """Run ``vmtransport restore --qmp`` into ``vm``; poll its run state as run_restore
    does after migrate-incoming. Returns the new run state, the seconds until it left
    ``inmigrate`` and the seconds until the command exited (both from ``start``)."""
    import subprocess

    from qemuvm import VMError

    assert c.qmp is not None
    err = work / "helper.err"
    with open(err, "wb") as f:
        proc = subprocess.Popen([*time_argv(cpu), *c.qmp(image, sock)],
                                stdin=subprocess.DEVNULL, stdout=f, stderr=f)
    try:
        deadline = start + 600
        while True:
            try:
                status = vm.status()
            except VMError as exc:  # QEMU exits when its load fails: say why vmtransport did
                rc = proc.wait(timeout=60)
                raise helper_failed(c, rc, err) from exc
            if status != "inmigrate":
                seconds = time.monotonic() - start
                break
            early = proc.poll()
            if early:
                raise helper_failed(c, early, err)
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{c.name}: destination still inmigrate after 600 s")
            time.sleep(0.005)
        rc = proc.wait(timeout=600)
        wall = time.monotonic() - start
        if rc != 0:
            raise helper_failed(c, rc, err)
        return status, seconds, wall
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def validation_cost(stream: Path) -> str:
    """CPU seconds per GiB of what a save adds per byte: the stream parser's walk and the
    XXH3-128 checksum, fed 8 MiB chunks of a real stream (read beforehand, not timed)."""
    import xxhash

    from vmtransport.stream import StreamParser

    chunk = 8 << 20
    size = stream.stat().st_size
    parser_cpu = hash_cpu = 0.0
    parser = StreamParser()
    digest = xxhash.xxh3_128()
    with open(stream, "rb") as f:
        while data := f.read(chunk):
            t = time.process_time()
            parser.feed(data)
            parser_cpu += time.process_time() - t
            t = time.process_time()
            digest.update(data)
            hash_cpu += time.process_time() - t
    t = time.process_time()
    parser.close()
    parser_cpu += time.process_time() - t
    gib = size / GIB
    return (f"Per GiB of stream ({size / GIB:.2f} GiB, 8 MiB chunks): stream parser "
            f"{parser_cpu / gib:.3f} CPU-s, XXH3-128 {hash_cpu / gib:.3f} CPU-s.")


def median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def table(title: str, mem: int, runs: dict[str, list[Run]], limit: str, disk: str) -> str:
    lim = median([r.seconds for r in runs[limit]])
    # What any contender that goes through the disk can reach in a round: the slower of
    # the limit and the disk alone. Paired like the limit's ratio.
    bounds = [max(a.seconds, d.seconds) for a, d in zip(runs[limit], runs[disk], strict=True)]
    out = [f"### {title}", "",
           "| contender | median s | GiB/s | limit / this | paired | reachable / this "
           "| helper CPU s | image cached | runs |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, rs in runs.items():
        sec = median([r.seconds for r in rs])
        assert sec is not None and lim is not None
        # Paired: the median over rounds of the limit's time / this one's in the same
        # round (they run back to back), which a machine's slow spells affect less.
        paired = median([a.seconds / b.seconds for a, b in zip(runs[limit], rs, strict=True)])
        assert paired is not None
        reach = median([b / r.seconds for b, r in zip(bounds, rs, strict=True)])
        cpu = median([r.cpu for r in rs])
        cached = median([r.cached for r in rs])
        out.append(
            f"| {name} | {sec:.2f} | {mem / 1024 / sec:.2f} | {lim / sec:.2f} | {paired:.2f} | "
            f"{'-' if name in (limit, disk) else f'{reach:.2f}'} | "
            f"{'n/a' if cpu is None else f'{cpu:.2f}'} | "
            f"{'-' if cached is None else f'{cached:.1%}'} | "
            f"{' '.join(f'{r.seconds:.2f}' for r in rs)} |"
        )
    return "\n".join(out)


def rotated(contenders: list[Contender], rnd: int) -> list[Contender]:
    """Round ``rnd``'s order: each round starts one contender later, so that a run's
    place in its round — which matters on this machine, for reasons not established
    (see docs/performance.md) — touches every contender alike."""
    if not contenders:  # --saves-only: no restores
        return []
    k = rnd % len(contenders)
    return contenders[k:] + contenders[:k]


def settle() -> None:
    """Between a round's saves and its restores: let the disk drain the saves' writes
    (without this pause the first restores of a round ran 0.5-1 s slower than in a
    probe on an idle disk)."""
    os.sync()
    time.sleep(SETTLE_S)


def _alone(contenders: list[Contender]) -> str:
    return next(c.name for c in contenders if c.alone is not None)


def bench_version(version: str, qemu: str, args: argparse.Namespace) -> list[str]:
    major = int(version.split(".")[0])
    load_start = os.getloadavg()
    work = Path(args.dir) / f"qemu{version}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src_ram = Path("/dev/shm/vmtbench-src.ram")
    if not src_ram.exists() or src_ram.stat().st_size != args.mem_mib << 20:
        make_ram_file(src_ram, args.mem_mib, random=True)
    # libvirt drives the system's QEMU only (its capabilities cache, its emulator path).
    virsh_ok = VIRSH_SKIP is None and os.path.realpath(qemu) == virsh.SYSTEM_QEMU

    def runnable(c: Contender) -> bool:
        return major >= c.min_qemu and (virsh_ok or not c.virsh)

    def wanted(c: Contender) -> bool:
        return runnable(c) and (c.limit or c.alone is not None or not args.only
                                or any(o in c.name for o in args.only.split(",")))

    var_saves, var_restores = variant_contenders(args.variants, args.variant_schemes)
    all_restores = RESTORES + var_restores
    restores = [c for c in all_restores if wanted(c)] if not args.saves_only else []
    # A restore reads what a save contender wrote; the limit reads cat's bare stream.
    needed = {c.image for c in restores} | ({"img-cat"} if restores else set())
    saves = [c for c in SAVES + var_saves if wanted(c) or (runnable(c) and c.image in needed)]
    save_runs: dict[str, list[Run]] = {c.name: [] for c in saves}
    cost = "(no bare stream saved: validation cost not measured)"
    restore_runs: dict[str, list[Run]] = {c.name: [] for c in restores}
    for rnd in range(args.rounds):
        for c in rotated(saves, rnd):
            r = run_save(qemu, work, src_ram, args.mem_mib, c)
            save_runs[c.name].append(r)
            print(f"  qemu {version} round {rnd + 1} save    {c.name}: {r.seconds:.2f} s"
                  f"{wall_note(r)}", file=sys.stderr, flush=True)
        # The limit serves the bare stream (cat's output) from tmpfs; vmtransport's own
        # saves are images (a 64 KiB header before the same stream).
        if rnd == 0 and (work / "img-cat").exists():
            cost = validation_cost(work / "img-cat")
        if restores:
            shutil.copyfile(work / "img-cat", "/dev/shm/vmtbench-img")
            settle()
        for c in rotated(restores, rnd):
            r = run_restore(qemu, work, src_ram, args.mem_mib, c, verify=rnd == 0)
            restore_runs[c.name].append(r)
            print(f"  qemu {version} round {rnd + 1} restore {c.name}: {r.seconds:.2f} s"
                  f"{wall_note(r)}", file=sys.stderr, flush=True)
        Path("/dev/shm/vmtbench-img").unlink(missing_ok=True)
        clear_images(work)
    shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()
    v = qemu_version(qemu)
    RAW[version] = {"save": {k: [r.seconds for r in rs] for k, rs in save_runs.items()},
                    "restore": {k: [r.seconds for r in rs] for k, rs in restore_runs.items()},
                    "load": [load_start, load_end],
                    # --qmp contenders: seconds from the command to its exit
                    "wall": {what: {k: [r.wall for r in rs] for k, rs in runs.items()
                                    if any(r.wall is not None for r in rs)}
                             for what, runs in (("save", save_runs),
                                                ("restore", restore_runs))}}
    load = (f"Load average (1, 5, 15 min) at the start {fmt_load(load_start)}, "
            f"at the end {fmt_load(load_end)}.")
    skipped = ""
    if not virsh_ok and any(c.virsh for c in SAVES + RESTORES if major >= c.min_qemu):
        skipped = (f" virsh contenders skipped: {VIRSH_SKIP}." if VIRSH_SKIP else
                   f" virsh contenders skipped: libvirt drives {virsh.SYSTEM_QEMU} only.")
    lines = [f"QEMU {v}. {cost} {load} Restore destinations' RAM: "
             f"{DST_MEMORY_TEXT[DST_MEMORY]}, {DST_HISTORY} (--dst-history).{skipped}", ""]
    for what, runs, cs in (("save", save_runs, saves), ("restore", restore_runs, restores)):
        if not cs:
            continue
        title = (f"QEMU {v}: save ({args.mem_mib} MiB of random RAM, {args.rounds} rounds)"
                 if what == "save" else
                 f"QEMU {v}: restore ({args.mem_mib} MiB, {args.rounds} rounds)")
        lines += [table(title, args.mem_mib, runs, cs[0].name, _alone(cs)), ""]
        walls = [f"{name} {m:.2f} s" for name, rs in runs.items()
                 if (m := median([r.wall for r in rs])) is not None]
        if walls:
            lines += [f"Wall time from the command to its exit (median): {'; '.join(walls)}.",
                      ""]
        named = [c.name for c in cs if c.name.startswith("variant ")]
        if len(named) > 1:
            lines += [variant_table(f"QEMU {v}: {what}, variants paired", runs, named), ""]
    return lines


def wall_note(r: Run) -> str:
    return "" if r.wall is None else f" (command to exit {r.wall:.2f} s)"


def fmt_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def variant_table(title: str, runs: dict[str, list[Run]], names: list[str]) -> str:
    """The variants against the first one: ratio of medians, and paired (the median over
    rounds of the first one's time / this one's in the same round); > 1: this is slower."""
    ref = names[0]
    ref_med = median([r.seconds for r in runs[ref]])
    out = [f"#### {title} (against {ref}; below 1.00: slower than it)", "",
           "| variant | median s | median / this | paired | per round |",
           "|---|---:|---:|---:|---|"]  # fmt: skip
    for name in names:
        sec = median([r.seconds for r in runs[name]])
        ratios = [a.seconds / b.seconds for a, b in zip(runs[ref], runs[name], strict=True)]
        paired = median(list(ratios))
        assert sec is not None and ref_med is not None and paired is not None
        out.append(f"| {name} | {sec:.3f} | {ref_med / sec:.3f} | {paired:.3f} | "
                   f"{' '.join(f'{x:.2f}' for x in ratios)} |")
    return "\n".join(out)


#: the raw runs per QEMU version, for --json
RAW: dict[str, Any] = {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mem-mib", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--qemu", default="7.2,10.0", help="versions, comma-separated")
    p.add_argument("--dir", default="/var/tmp/vmtransport-bench",
                   help="where images are written (a real disk, not tmpfs)")
    p.add_argument("--json", help="also write the raw runs here")
    p.add_argument("--only", help="only contenders whose name contains one of these "
                   "comma-separated strings (the limits always run)")
    p.add_argument("--saves-only", action="store_true")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=PATH[:ENV=VAL,...]",
                   help="also run the vmtransport at PATH (a checkout, a virtualenv, a "
                   "venv's python or an executable) with these environment variables, as "
                   "contenders 'variant NAME: save/restore SCHEME:' in every round; "
                   "repeatable")
    p.add_argument("--variant-schemes", default="odirect",
                   help="the variants' target schemes, comma-separated (default: odirect)")
    p.add_argument("--drop-caches", action="store_true",
                   help="drop the whole page cache before each run, not only the images'")
    p.add_argument("--dst-memory", choices=sorted(DST_MEMORY_TEXT), default="anon",
                   help="the restore destinations' RAM: anonymous, as libvirt's (default), "
                   "or the source's shape, a shared file on /dev/shm (4 KiB pages: loads "
                   "~2x slower)")
    p.add_argument("--dst-history", choices=["warm", "cold", "as-is"], default="warm",
                   help="right before each restore: touch and free MEM + 256 MiB (warm, "
                   "the default), idle 8 s (cold), or neither (as-is): the memory a "
                   "destination faults in then has the same history in every run")
    p.add_argument("--no-virsh", action="store_true",
                   help="leave out the virsh contenders (libvirtd is not started)")
    args = p.parse_args()
    try:
        args.variants = [parse_variant(v) for v in args.variant]
    except ValueError as exc:
        sys.exit(f"bench.py: {exc}")
    if len({v.name for v in args.variants}) != len(args.variants):
        sys.exit("bench.py: --variant: two variants of the same NAME")
    args.variant_schemes = [x for x in args.variant_schemes.split(",") if x]
    if not set(args.variant_schemes) <= {"odirect", "file"}:
        sys.exit(f"bench.py: --variant-schemes {','.join(args.variant_schemes)}: "
                 "odirect and file only")
    global DROP_ALL, DST_MEMORY, DST_HISTORY, VIRSH_SKIP
    DROP_ALL = args.drop_caches
    DST_MEMORY = args.dst_memory
    DST_HISTORY = args.dst_history
    if os.geteuid() != 0:
        sys.exit("bench.py: needs root (QEMU with KVM, /dev/shm, drop_caches)")
    libvirt = virsh.Libvirt()
    if args.no_virsh:
        VIRSH_SKIP = "--no-virsh"
    elif args.only and "virsh" not in args.only:
        VIRSH_SKIP = "not in --only"
    else:
        try:
            libvirt.__enter__()
        except (virsh.Unavailable, OSError) as exc:
            VIRSH_SKIP = str(exc)
            print(f"bench.py: virsh contenders skipped: {exc}", file=sys.stderr)
    try:
        run(args)
    finally:
        libvirt.__exit__(None, None, None)


def run(args: argparse.Namespace) -> None:
    qemus = find_qemus()
    cold = "page cache dropped" if DROP_ALL else "images evicted from the page cache"
    lines = [f"`{' '.join(sys.argv)}` — {os.cpu_count()} cores, "
             f"kernel {os.uname().release}, images on {args.dir}, {cold} before each run", ""]
    lines += [f"Variant {v.name}: `{v.command()}`" for v in args.variants]
    lines += [""] if args.variants else []
    for version in args.qemu.split(","):
        if version not in qemus:
            sys.exit(f"bench.py: QEMU {version} not found; run scripts/setup.sh")
        lines += bench_version(version, qemus[version], args)
    print("\n".join(lines))
    if args.json:
        variants = {v.name: v.command() for v in args.variants}
        Path(args.json).write_text(
            json.dumps({"table": lines, "runs": RAW, "variants": variants}, indent=1))
    Path("/dev/shm/vmtbench-src.ram").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
