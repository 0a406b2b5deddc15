"""The built-in transports, both directions, through the real ``vmtransport`` command
(``save`` from stdin, ``restore`` to stdout, ``copy``) and the async API: real files,
pipes, sockets, mounts (ramfs, tmpfs) and shell commands.

save/restore/copy validate what passes as a QEMU migration stream, so the payloads are
synthetic QEMU streams (:func:`qemu_stream`: random RAM pages, any length); byte-exact
checks use ``format=raw`` or the byte-level API (``open_sink``/``open_source``).
"""

from __future__ import annotations

import array
import errno
import fcntl
import hashlib
import json
import mmap
import os
import random
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TypeVar

import pytest
import trio

import vmtransport
from vmtransport import TransportError
from vmtransport._pagecache import cached_bytes

VMT = Path(sys.executable).parent / "vmtransport"
MIB = 1 << 20
TIMEOUT = 60
PAGE = 4096
SIZES = [3 * MIB, 50 * MIB]  # approximate: the streams' lengths are never page multiples
SIZE_IDS = ["3MiB", "50MiB"]
IS_ROOT = os.geteuid() == 0
F = TypeVar("F", bound=Callable[..., object])


def root_only(test: F) -> F:
    """Needs root (mounts); run wherever we are root, as in CI."""
    marked: F = pytest.mark.root(
        pytest.mark.skipif(not IS_ROOT, reason="needs root to mount filesystems")(test)
    )
    return marked


Stdin = int | IO[bytes] | None


# --- QEMU streams ---------------------------------------------------------------------------

_SID = 2  # the RAM section's id
_BLOCK = "pc.ram"


def _name(s: str) -> bytes:
    return bytes((len(s),)) + s.encode()


def _ram_setup(block_size: int) -> bytes:
    """Header, configuration, and the RAM section's START with its block list."""
    machine = b"pc-i440fx-7.2"
    return b"".join(
        [
            b"QEVM" + struct.pack(">I", 3),
            b"\x07" + struct.pack(">I", len(machine)) + machine,
            b"\x01" + struct.pack(">I", _SID) + _name("ram") + struct.pack(">II", 0, 4),
            struct.pack(">Q", block_size | 0x04) + _name(_BLOCK) + struct.pack(">Q", block_size),
            struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", _SID),
        ]
    )


def _ram_part(pages: Sequence[memoryview | bytes], first: int, block_size: int) -> bytes:
    """One PART section of the RAM section carrying ``pages`` from page number ``first``."""
    out = [b"\x02" + struct.pack(">I", _SID)]
    for i, page in enumerate(pages):
        off = ((first + i) * PAGE) % block_size
        if i == 0:
            out.append(struct.pack(">Q", off | 0x08) + _name(_BLOCK))
        else:
            out.append(struct.pack(">Q", off | 0x28))  # RAM_SAVE_FLAG_CONTINUE
        out.append(bytes(page))
    out.append(struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", _SID))
    return b"".join(out)


def _ram_end(pad: int = 0) -> bytes:
    """The RAM section's END, QEMU's EOF marker, and the VM description (``pad`` bytes
    of filler in it tune the stream's length)."""
    desc = json.dumps({"page_size": PAGE, "devices": [], "pad": "x" * pad}).encode()
    return b"".join(
        [
            b"\x03" + struct.pack(">I", _SID) + struct.pack(">Q", 0x10),
            b"\x7e" + struct.pack(">I", _SID),
            b"\x00",
            b"\x06" + struct.pack(">I", len(desc)) + desc,
        ]
    )


def qemu_stream(pages: int, *, seed: int = 0, pad: int = 0) -> bytes:
    """A complete, valid QEMU migration stream with ``pages`` random RAM pages."""
    block_size = max(64 * MIB, -(-pages * PAGE // MIB) * MIB)
    data = memoryview(random.Random(seed).randbytes(pages * PAGE))
    parts = [_ram_setup(block_size)]
    per_part = 256
    for first in range(0, pages, per_part):
        chunk = [data[i * PAGE : (i + 1) * PAGE] for i in range(first, min(pages, first + per_part))]
        parts.append(_ram_part(chunk, first, block_size))
    parts.append(_ram_end(pad))
    return b"".join(parts)


def stream_of_about(size: int, *, seed: int = 0) -> bytes:
    """A valid stream of about ``size`` bytes whose length is not a multiple of 4096."""
    s = qemu_stream(max(1, size // (PAGE + 8)), seed=seed)
    assert len(s) % PAGE, "tune pad"
    return s


def big_stream(total: int) -> Iterator[bytes]:
    """A valid stream of at least ``total`` bytes, cheaply: one 1 MiB RAM section
    (the same 256 pages) repeated."""
    block_size = 64 * MIB
    pages = [random.Random(1).randbytes(PAGE)] * 256
    yield _ram_setup(block_size)
    part = _ram_part(pages, 0, block_size)
    for _ in range(-(-total // len(part))):
        yield part
    yield _ram_end()


# --- helpers ------------------------------------------------------------------------------


def vmt(
    *args: str,
    stdin: Stdin = subprocess.DEVNULL,
    input: bytes | None = None,
    stdout: int | IO[bytes] = subprocess.PIPE,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run the real command to completion (with a hard timeout)."""
    return subprocess.run(
        [str(VMT), *args],
        stdin=None if input is not None else stdin,
        input=input,
        stdout=stdout,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )


def error_line(r: subprocess.CompletedProcess[bytes]) -> str:
    """The single ``vmtransport: error:`` line a failed run printed (and nothing else)."""
    text = r.stderr.decode(errors="replace")
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("vmtransport: error: "), text
    assert "Traceback" not in text
    return lines[0]


def last_error_line(r: subprocess.CompletedProcess[bytes]) -> str:
    """The error line of a run whose command also wrote to stderr (exec:)."""
    text = r.stderr.decode(errors="replace")
    assert "Traceback" not in text
    lines = text.splitlines()
    assert lines, text
    assert lines[-1].startswith("vmtransport: error: "), text
    return lines[-1]


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def temps(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.vmtransport-tmp"))


def open_in(pid: int, directory: Path) -> list[str]:
    """What process ``pid`` has open in ``directory``: a save's temporary, named or not
    (an O_TMPFILE shows as ``DIR/#INODE (deleted)``)."""
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        raise AssertionError(f"process {pid} exited") from None
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{directory}/"):
            found.append(target)
    return found


def wait_until(cond: Callable[[], object], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def fs_type(path: Path) -> str:
    return subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def make_stream(path: Path, size: int, *, seed: int = 0) -> Path:
    """Write a valid QEMU stream of about ``size`` bytes to ``path``."""
    path.write_bytes(stream_of_about(size, seed=seed))
    return path


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("payloads")
    return {size: make_stream(d / f"p{size}", size, seed=size) for size in SIZES}


@pytest.fixture(scope="module")
def small() -> bytes:
    """A small valid stream (3 pages)."""
    return qemu_stream(3, seed=3)


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(fstype, *options) -> a fresh mount point below tmp_path; unmounted after."""
    mounted: list[Path] = []

    def mount(fstype: str, *options: str) -> Path:
        point = tmp_path / f"mnt-{fstype}-{len(mounted)}"
        point.mkdir()
        opts = ["-o", ",".join(options)] if options else []
        subprocess.run(
            ["mount", "-t", fstype, *opts, fstype, str(point)], check=True, timeout=TIMEOUT
        )
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        r = subprocess.run(["umount", str(point)], check=False, timeout=TIMEOUT)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(point)], check=False, timeout=TIMEOUT)


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a disk filesystem (O_DIRECT and a page cache that can be left)."""
    if fs_type(tmp_path) not in ("tmpfs", "ramfs", "overlayfs", "fuseblk"):
        yield tmp_path
        return
    repo = Path(__file__).resolve().parent.parent
    if fs_type(repo) in ("tmpfs", "ramfs", "overlayfs", "fuseblk"):
        pytest.skip("no disk filesystem for page-cache measurements")
    with tempfile.TemporaryDirectory(dir=repo, prefix=".pytest-odirect-") as d:
        yield Path(d)


# --- file: ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["file", "odirect"])
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_round_trip(payloads: dict[int, Path], disk_dir: Path, scheme: str, size: int) -> None:
    src = payloads[size]
    image = disk_dir / "vm.sav"
    with open(src, "rb") as f:
        r = vmt("save", f"{scheme}:{image}", stdin=f)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    st = image.stat()
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == size  # exact: no padding left from an unaligned tail
    assert sha(image) == sha(src)
    assert temps(disk_dir) == []
    out = disk_dir / "restored"
    with open(out, "wb") as f:
        r = vmt("restore", f"{scheme}:{image}", stdout=f)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size == size
    assert sha(out) == sha(src)


@pytest.mark.parametrize(
    ("src_scheme", "dst_scheme"), [("file", "odirect"), ("odirect", "file"), ("file", "file")]
)
def test_cli_copy(
    payloads: dict[int, Path], disk_dir: Path, src_scheme: str, dst_scheme: str
) -> None:
    src = payloads[SIZES[1]]
    dst = disk_dir / "copy.sav"
    r = vmt("copy", f"{src_scheme}:{src}", f"{dst_scheme}:{dst}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b""
    assert sha(dst) == sha(src)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600
    assert temps(disk_dir) == []


async def test_async_copy_and_open_source(payloads: dict[int, Path], disk_dir: Path) -> None:
    src = payloads[SIZES[2]]
    dst = disk_dir / "async.sav"
    with trio.fail_after(TIMEOUT):
        stats = await vmtransport.copy(f"file:{src}", f"odirect:{dst}")
    assert stats.bytes == src.stat().st_size
    assert sha(dst) == sha(src)
    # Read it back through a Source by hand, into a page-aligned buffer as the pump does
    # (Source.readinto's contract: O_DIRECT reads need one).
    h = hashlib.sha256()
    buf = mmap.mmap(-1, MIB)
    with trio.fail_after(TIMEOUT):
        source = await vmtransport.open_source(f"odirect:{dst}")
        total = 0
        while n := await source.readinto(memoryview(buf)):
            h.update(buf[:n])
            total += n
        await source.commit()
    buf.close()
    assert total == src.stat().st_size
    assert h.hexdigest() == sha(src)


async def test_async_save_from_fd(payloads: dict[int, Path], tmp_path: Path) -> None:
    src = payloads[SIZES[1]]
    dst = tmp_path / "saved"
    fd = os.open(src, os.O_RDONLY)
    try:
        with trio.fail_after(TIMEOUT):
            stats = await vmtransport.save(f"file:{dst}", fd)
    finally:
        os.close(fd)
    assert stats.bytes == src.stat().st_size
    assert sha(dst) == sha(src)


def test_file_overwrite_is_0600_and_replaces(tmp_path: Path) -> None:
    image = tmp_path / "vm.sav"
    image.write_bytes(b"old content that is longer than the new one" * 100)
    image.chmod(0o644)
    r = vmt("save", f"file:{image}", input=b"new")
    assert r.returncode == 0, r.stderr
    assert image.read_bytes() == b"new"
    assert stat.S_IMODE(image.stat().st_mode) == 0o600


def start_save(uri: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(VMT), "save", uri], stdin=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("scheme", ["file", "odirect"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_save_is_atomic(tmp_path: Path, scheme: str, existing: bool) -> None:
    image = tmp_path / "vm.sav"
    old = b"the previous image\n" * 1000
    if existing:
        image.write_bytes(old)
    data = os.urandom(3 * MIB + 123)
    half = len(data) // 2
    proc = start_save(f"{scheme}:{image}")
    try:
        assert proc.stdin is not None
        proc.stdin.write(data[:half])
        proc.stdin.flush()
        wait_until(lambda: open_in(proc.pid, tmp_path), "the temporary file")
        (tmp,) = open_in(proc.pid, tmp_path)
        assert tmp != str(image)
        # Where the filesystem has no O_TMPFILE the temporary has a name beside the image.
        assert tmp.endswith(" (deleted)") or temps(tmp_path) == [Path(tmp)]
        if existing:
            assert image.read_bytes() == old
        else:
            assert not image.exists()
        _, err = proc.communicate(data[half:], timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert image.read_bytes() == data
    assert temps(tmp_path) == []


@pytest.mark.parametrize(
    ("scheme", "existing", "sig"),
    [
        ("file", False, signal.SIGTERM),
        ("file", True, signal.SIGTERM),
        ("odirect", False, signal.SIGTERM),
        ("odirect", True, signal.SIGTERM),
        ("file", True, signal.SIGINT),
        ("odirect", False, signal.SIGHUP),
    ],
    ids=[
        "file-new-TERM",
        "file-overwrite-TERM",
        "odirect-new-TERM",
        "odirect-overwrite-TERM",
        "file-overwrite-INT",
        "odirect-new-HUP",
    ],
)
def test_killed_save_leaves_nothing(
    tmp_path: Path, scheme: str, existing: bool, sig: signal.Signals
) -> None:
    image = tmp_path / "vm.sav"
    old = b"the previous image\n" * 1000
    if existing:
        image.write_bytes(old)
    proc = start_save(f"{scheme}:{image}")
    try:
        assert proc.stdin is not None
        proc.stdin.write(os.urandom(20 * MIB))  # more than a pump buffer: some is written
        proc.stdin.flush()
        wait_until(lambda: open_in(proc.pid, tmp_path), "the temporary file")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    lines = err.decode().splitlines()
    assert lines == [f"vmtransport: error: interrupted by {sig.name}"]
    assert sorted(os.listdir(tmp_path)) == (["vm.sav"] if existing else [])
    if existing:
        assert image.read_bytes() == old


def has_tmpfile(directory: Path) -> bool:
    try:
        os.close(os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("scheme", ["file", "odirect"])
def test_sigkilled_save_leaves_nothing_where_there_is_o_tmpfile(
    tmp_path: Path, scheme: str
) -> None:
    if not has_tmpfile(tmp_path):
        pytest.skip(f"{fs_type(tmp_path)} has no O_TMPFILE: a SIGKILL leaves a named temporary")
    image = tmp_path / "vm.sav"
    image.write_bytes(b"old")
    proc = start_save(f"{scheme}:{image}")
    try:
        assert proc.stdin is not None
        proc.stdin.write(os.urandom(20 * MIB))
        proc.stdin.flush()
        wait_until(lambda: open_in(proc.pid, tmp_path), "the temporary file")
        proc.kill()
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert os.listdir(tmp_path) == ["vm.sav"]
    assert image.read_bytes() == b"old"


def pipe_fill(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


@pytest.mark.parametrize("command", ["restore", "save"])
def test_sigterm_is_heeded_when_the_consumer_stalls(tmp_path: Path, command: str) -> None:
    """A consumer that keeps its pipe open but stops reading (a stopped QEMU) must not
    keep the helper alive after SIGTERM."""
    image = make_payload(tmp_path / "vm.sav", 40 * MIB)
    rfd, wfd = os.pipe()
    args: list[str]
    fds: tuple[int, ...]
    stdin: int
    stdout: int | None
    try:
        if command == "restore":
            args, fds, stdin, stdout = [f"file:{image}"], (), subprocess.DEVNULL, wfd
        else:
            args, fds, stdin, stdout = [f"fd:{wfd}"], (wfd,), os.open(image, os.O_RDONLY), None
        proc = subprocess.Popen(
            [str(VMT), command, *args],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            pass_fds=fds,
        )
        if stdin >= 0:
            os.close(stdin)
        try:
            # The pipe is full (grown to 1 MiB): the helper's writer is stuck.
            wait_until(lambda: pipe_fill(rfd) >= 1 << 20, "a full pipe")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        os.close(rfd)
        os.close(wfd)
    assert proc.returncode == 1
    assert err.decode().splitlines() == ["vmtransport: error: interrupted by SIGTERM"]


def test_killed_copy_leaves_nothing(tmp_path: Path) -> None:
    """The async path (copy, restore) turns SIGTERM into cancellation and cleans up too."""
    image = tmp_path / "vm.sav"
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            [str(VMT), "copy", f"fd:{r}", f"file:{image}"],
            pass_fds=(r,),
            stderr=subprocess.PIPE,
        )
        os.close(r)
        r = -1
        try:
            os.write(w, os.urandom(MIB))
            wait_until(lambda: open_in(proc.pid, tmp_path), "the temporary file")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        os.close(w)
        if r >= 0:
            os.close(r)
    assert proc.returncode == 1
    assert err.decode().splitlines() == ["vmtransport: error: interrupted by SIGTERM"]
    assert os.listdir(tmp_path) == []


def test_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"must stay")
    link = tmp_path / "vm.sav"
    link.symlink_to(victim)
    r = vmt("save", f"file:{link}", input=b"new stream")
    assert r.returncode == 0, r.stderr
    assert not link.is_symlink()
    assert link.read_bytes() == b"new stream"
    assert victim.read_bytes() == b"must stay"


def test_dangling_symlink_is_replaced(tmp_path: Path) -> None:
    link = tmp_path / "vm.sav"
    link.symlink_to(tmp_path / "nowhere")
    r = vmt("save", f"file:{link}", input=b"x")
    assert r.returncode == 0, r.stderr
    assert not link.is_symlink()
    assert link.read_bytes() == b"x"
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize(("scheme", "offset"), [("file", 1000), ("odirect", 8192)])
def test_offset_keeps_the_prefix(tmp_path: Path, scheme: str, offset: int) -> None:
    image = tmp_path / "vm.sav"
    prefix = os.urandom(offset)
    image.write_bytes(prefix + b"J" * 100_000)  # junk after the prefix goes away
    stream = os.urandom(MIB + 77)
    uri = f"{scheme}:{image},offset={offset}"
    r = vmt("save", uri, input=stream)
    assert r.returncode == 0, r.stderr
    assert image.read_bytes() == prefix + stream
    r = vmt("restore", uri)
    assert r.returncode == 0, r.stderr
    assert r.stdout == stream
    # Without the offset the restore sees the prefix too.
    r = vmt("restore", f"{scheme}:{image}")
    assert r.stdout == prefix + stream


@pytest.mark.parametrize("scheme", ["file", "odirect"])
def test_offset_into_a_missing_or_short_file_pads_with_zeros(tmp_path: Path, scheme: str) -> None:
    missing = tmp_path / "new.sav"
    r = vmt("save", f"{scheme}:{missing},offset=4096", input=b"stream")
    assert r.returncode == 0, r.stderr
    assert missing.read_bytes() == bytes(4096) + b"stream"
    short = tmp_path / "short.sav"
    short.write_bytes(b"abc")
    r = vmt("save", f"{scheme}:{short},offset=8192", input=b"stream")
    assert r.returncode == 0, r.stderr
    assert short.read_bytes() == b"abc" + bytes(8189) + b"stream"


@pytest.mark.parametrize("scheme", ["file", "odirect"])
def test_save_into_missing_directory(tmp_path: Path, scheme: str) -> None:
    uri = f"{scheme}:{tmp_path}/no/such/dir/vm.sav"
    r = vmt("save", uri, input=b"abc")
    assert r.returncode == 1
    line = error_line(r)
    assert uri in line
    assert "does not exist" in line
    assert not (tmp_path / "no").exists()


def test_save_onto_a_directory(tmp_path: Path) -> None:
    r = vmt("save", f"file:{tmp_path}", input=b"abc")
    assert r.returncode == 1
    assert "is a directory" in error_line(r)


@pytest.mark.parametrize("scheme", ["file", "odirect"])
def test_restore_missing_file(tmp_path: Path, scheme: str) -> None:
    uri = f"{scheme}:{tmp_path}/absent.sav"
    r = vmt("restore", uri)
    assert r.returncode == 1
    line = error_line(r)
    assert uri in line
    assert "No such file or directory" in line
    assert r.stdout == b""


def test_save_to_a_fifo_writes_in_place(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = os.urandom(2 * MIB + 5)
    got: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as f:
            got.append(f.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    r = vmt("save", f"file:{fifo}", input=data)
    reader.join(TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert got == [data]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert temps(tmp_path) == []


# --- odirect: -------------------------------------------------------------------------------


def test_odirect_leaves_no_page_cache(disk_dir: Path) -> None:
    size = 64 * MIB + 1000
    src = make_payload(disk_dir / "src", size)
    image = disk_dir / "direct.sav"
    with open(src, "rb") as f:
        r = vmt("save", f"odirect:{image}", stdin=f)
    assert r.returncode == 0, r.stderr
    cached, total = cached_bytes(image)
    assert total == size
    assert cached <= size // 100, f"{cached} of {size} bytes cached after an odirect save"
    with open(os.devnull, "wb") as null:
        r = vmt("restore", f"odirect:{image}", stdout=null)
    assert r.returncode == 0, r.stderr
    cached, _ = cached_bytes(image)
    assert cached <= size // 100, f"{cached} of {size} bytes cached after an odirect restore"
    # Control: the same through file: does fill the cache, so the measurement means something.
    with open(os.devnull, "wb") as null:
        r = vmt("restore", f"file:{image}", stdout=null)
    assert r.returncode == 0, r.stderr
    cached, _ = cached_bytes(image)
    assert cached > size // 2
    assert sha(image) == sha(src)


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 8 * MIB - 1, 8 * MIB + 1])
async def test_odirect_unaligned_tails(tmp_path: Path, size: int) -> None:
    """In-process (vmtransport.save/restore on descriptors): the length is exact."""
    data = os.urandom(size)
    src, image, out = tmp_path / "src", tmp_path / "vm.sav", tmp_path / "out"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        with trio.fail_after(TIMEOUT):
            stats = await vmtransport.save(f"odirect:{image}", fd)
    finally:
        os.close(fd)
    assert stats.bytes == size
    assert image.stat().st_size == size
    assert image.read_bytes() == data
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with trio.fail_after(TIMEOUT):
            stats = await vmtransport.restore(f"odirect:{image}", fd)
    finally:
        os.close(fd)
    assert stats.bytes == size
    assert out.read_bytes() == data


@pytest.mark.parametrize("via", ["save", "copy"])
@root_only
def test_odirect_fallback_on_ramfs(
    mounter: Callable[..., Path], payloads: dict[int, Path], via: str
) -> None:
    mnt = mounter("ramfs")
    src = payloads[SIZES[1]]
    uri = f"odirect:{mnt}/vm.sav"
    if via == "save":
        with open(src, "rb") as f:
            r = vmt("save", uri, stdin=f)
    else:
        r = vmt("copy", f"file:{src}", uri)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0]
    assert "O_DIRECT" in lines[0]
    assert uri in lines[0]
    assert sha(mnt / "vm.sav") == sha(src)
    assert stat.S_IMODE((mnt / "vm.sav").stat().st_mode) == 0o600
    assert temps(mnt) == []
    # Restore falls back the same way, with one warning.
    r = vmt("restore", uri)
    assert r.returncode == 0
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "O_DIRECT" in lines[0]
    assert hashlib.sha256(r.stdout).hexdigest() == sha(src)


@root_only
def test_odirect_fallback_offset_on_ramfs(mounter: Callable[..., Path]) -> None:
    mnt = mounter("ramfs")
    image = mnt / "vm.sav"
    prefix = os.urandom(4096)
    image.write_bytes(prefix)
    stream = os.urandom(100_000)
    r = vmt("save", f"odirect:{image},offset=4096", input=stream)
    assert r.returncode == 0, r.stderr
    assert image.read_bytes() == prefix + stream
    r = vmt("restore", f"odirect:{image},offset=4096")
    assert r.returncode == 0, r.stderr
    assert r.stdout == stream


@root_only
def test_odirect_fallback_error_on_ramfs(mounter: Callable[..., Path]) -> None:
    mnt = mounter("ramfs")
    uri = f"odirect:{mnt}/vm.sav,fallback=error"
    r = vmt("save", uri, input=b"stream")
    assert r.returncode == 1
    line = error_line(r)
    assert uri in line
    assert "refuses O_DIRECT" in line
    assert "fallback=error" in line
    assert list(mnt.iterdir()) == []
    (mnt / "vm.sav").write_bytes(b"stream")
    r = vmt("restore", uri)
    assert r.returncode == 1
    assert "refuses O_DIRECT" in error_line(r)
    assert r.stdout == b""


@root_only
def test_odirect_on_tmpfs_needs_no_fallback(
    mounter: Callable[..., Path], payloads: dict[int, Path]
) -> None:
    mnt = mounter("tmpfs", "size=64m")
    src = payloads[SIZES[1]]
    uri = f"odirect:{mnt}/vm.sav"
    try:
        os.close(os.open(mnt / "probe", os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600))
    except OSError as exc:  # tmpfs takes O_DIRECT since Linux 6.6
        assert exc.errno == errno.EINVAL
        pytest.skip(f"this kernel's tmpfs refuses O_DIRECT ({os.uname().release})")
    with open(src, "rb") as f:
        r = vmt("save", uri, stdin=f)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    assert sha(mnt / "vm.sav") == sha(src)
    r = vmt("restore", uri)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    assert hashlib.sha256(r.stdout).hexdigest() == sha(src)


@pytest.mark.parametrize("via", ["save", "copy"])
@pytest.mark.parametrize("scheme", ["file", "odirect"])
@root_only
def test_disk_full(mounter: Callable[..., Path], tmp_path: Path, scheme: str, via: str) -> None:
    mnt = mounter("tmpfs", "size=8m")
    src = make_payload(tmp_path / "src", 20 * MIB + 3)
    uri = f"{scheme}:{mnt}/vm.sav"
    if via == "save":
        with open(src, "rb") as f:
            r = vmt("save", uri, stdin=f)
    else:
        r = vmt("copy", f"file:{src}", uri)
    assert r.returncode == 1
    line = error_line(r)
    assert "No space left on device" in line
    assert uri in line
    assert list(mnt.iterdir()) == []


@root_only
def test_disk_full_keeps_the_old_image(mounter: Callable[..., Path]) -> None:
    mnt = mounter("tmpfs", "size=8m")
    image = mnt / "vm.sav"
    old = os.urandom(MIB)
    image.write_bytes(old)
    r = vmt("save", f"odirect:{image}", input=os.urandom(12 * MIB))
    assert r.returncode == 1
    assert "No space left on device" in error_line(r)
    assert image.read_bytes() == old
    assert [p.name for p in mnt.iterdir()] == ["vm.sav"]


# --- fd: -----------------------------------------------------------------------------------


def test_fd_number_save_and_restore_regular_file(payloads: dict[int, Path], tmp_path: Path) -> None:
    src = payloads[SIZES[1]]
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with open(src, "rb") as f:
            r = vmt("save", f"fd:{fd}", stdin=f, pass_fds=(fd,))
    finally:
        os.close(fd)
    assert r.returncode == 0, r.stderr
    assert sha(out) == sha(src)
    fd = os.open(out, os.O_RDONLY)
    try:
        r = vmt("restore", f"fd:{fd}", pass_fds=(fd,))
    finally:
        os.close(fd)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).hexdigest() == sha(src)


def test_fd_save_into_a_pipe(payloads: dict[int, Path]) -> None:
    src = payloads[SIZES[1]]
    rfd, wfd = os.pipe()
    try:
        with open(src, "rb") as f:
            proc = subprocess.Popen(
                [str(VMT), "save", f"fd:{wfd}"],
                stdin=f,
                pass_fds=(wfd,),
                stderr=subprocess.PIPE,
            )
        os.close(wfd)
        wfd = -1
        h = hashlib.sha256()
        with open(rfd, "rb", closefd=False) as reader:
            while chunk := reader.read(MIB):
                h.update(chunk)
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        assert h.hexdigest() == sha(src)
        assert fcntl.fcntl(rfd, fcntl.F_GETPIPE_SZ) == 1 << 20  # grown by the sink
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)


def test_fd_restore_from_a_pipe_reads_non_blocking(payloads: dict[int, Path]) -> None:
    src = payloads[SIZES[1]]
    data = src.read_bytes()
    rfd, wfd = os.pipe()
    try:
        assert not fcntl.fcntl(rfd, fcntl.F_GETFL) & os.O_NONBLOCK
        proc = subprocess.Popen(
            [str(VMT), "restore", f"fd:{rfd}"],
            pass_fds=(rfd,),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            # The helper puts the shared open file description in non-blocking mode...
            wait_until(
                lambda: fcntl.fcntl(rfd, fcntl.F_GETFL) & os.O_NONBLOCK, "O_NONBLOCK on the pipe"
            )
            assert fcntl.fcntl(rfd, fcntl.F_GETPIPE_SZ) == 1 << 20
            w, wfd = wfd, -1

            def produce() -> None:
                try:
                    os.write(w, data)
                finally:
                    os.close(w)

            writer = threading.Thread(target=produce)
            writer.start()
            out, err = proc.communicate(timeout=TIMEOUT)
            writer.join(TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert out == data
        # ... and puts the flags back when done.
        assert not fcntl.fcntl(rfd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)


def test_fd_socketpair_both_ways(payloads: dict[int, Path]) -> None:
    data = payloads[SIZES[1]].read_bytes()
    a, b = socket.socketpair()
    with a, b:
        got: list[bytes] = []

        def drain() -> None:
            parts = []
            while chunk := a.recv(MIB):
                parts.append(chunk)
            got.append(b"".join(parts))

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        r = vmt("save", f"fd:{b.fileno()}", input=data, pass_fds=(b.fileno(),))
        assert r.returncode == 0, r.stderr
        b.shutdown(socket.SHUT_WR)
        reader.join(TIMEOUT)
        assert got == [data]

    a, b = socket.socketpair()
    with a, b:

        def send() -> None:
            a.sendall(data)
            a.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        r = vmt("restore", f"fd:{b.fileno()}", pass_fds=(b.fileno(),))
        sender.join(TIMEOUT)
        assert r.returncode == 0, r.stderr
        assert r.stdout == data


async def test_fd_open_source_on_a_pipe_in_process() -> None:
    data = os.urandom(3 * MIB + 1)
    rfd, wfd = os.pipe()

    def produce() -> None:
        try:
            os.write(wfd, data)
        finally:
            os.close(wfd)

    got = bytearray()
    with trio.fail_after(TIMEOUT):
        source = await vmtransport.open_source(f"fd:{rfd}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, produce)
            buf = bytearray(100_000)
            while n := await source.readinto(memoryview(buf)):
                got += buf[:n]
        await source.commit()
    assert bytes(got) == data
    with pytest.raises(OSError) as info:
        os.fstat(rfd)  # the source owned the descriptor and closed it
    assert info.value.errno == errno.EBADF


# fd:NAME: a wrapper moves the given fds to 3, 4, ... (as systemd passes them), sets
# LISTEN_PID as asked ("-": unset, "self": its own pid, which exec keeps) and execs argv.
_LISTEN_WRAPPER = """
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
if sys.argv[2] == "self":
    os.environ["LISTEN_PID"] = str(os.getpid())
elif sys.argv[2] != "-":
    os.environ["LISTEN_PID"] = sys.argv[2]
os.execv(sys.argv[3], sys.argv[3:])
"""


def vmt_listen(
    fds: Sequence[int],
    names: str,
    *args: str,
    listen_pid: str = "-",
    count: int | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["LISTEN_FDS"] = str(len(fds) if count is None else count)
    env["LISTEN_FDNAMES"] = names
    return subprocess.run(
        [
            sys.executable,
            "-c",
            _LISTEN_WRAPPER,
            ",".join(map(str, fds)),
            listen_pid,
            str(VMT),
            *args,
        ],
        input=input if input is not None else b"",
        capture_output=True,
        pass_fds=tuple(fds),
        env=env,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.mark.parametrize("listen_pid", ["-", "self"])
def test_fd_name_save_and_restore(tmp_path: Path, listen_pid: str) -> None:
    data = os.urandom(MIB + 3)
    decoy, out = tmp_path / "decoy", tmp_path / "out"
    d = os.open(decoy, os.O_WRONLY | os.O_CREAT, 0o600)
    o = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        r = vmt_listen([d, o], "decoy:state", "save", "fd:state", listen_pid=listen_pid, input=data)
    finally:
        os.close(d)
        os.close(o)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data
    assert decoy.read_bytes() == b""
    i = os.open(out, os.O_RDONLY)
    d = os.open(decoy, os.O_RDONLY)
    try:
        r = vmt_listen([d, i], "decoy:incoming", "restore", "fd:incoming", listen_pid=listen_pid)
    finally:
        os.close(i)
        os.close(d)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data


def test_fd_name_wrong_listen_pid_is_refused(tmp_path: Path) -> None:
    o = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        r = vmt_listen([o], "state", "save", "fd:state", listen_pid="1", input=b"abc")
    finally:
        os.close(o)
    assert r.returncode == 1
    line = error_line(r)
    assert "fd:state" in line
    assert "LISTEN_PID=1 is not this process" in line
    assert (tmp_path / "out").read_bytes() == b""


def test_fd_name_unknown_lists_passed_names(tmp_path: Path) -> None:
    a = os.open(tmp_path / "a", os.O_RDONLY | os.O_CREAT, 0o600)
    b = os.open(tmp_path / "b", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        r = vmt_listen([a, b], "alpha:beta", "restore", "fd:gamma")
        r2 = vmt_listen([a, b], "alpha:beta", "restore", "fd:beta", count=1)
    finally:
        os.close(a)
        os.close(b)
    assert r.returncode == 1
    line = error_line(r)
    assert "fd:gamma" in line
    assert "no descriptor named 'gamma'" in line
    assert "(LISTEN_FDNAMES: alpha, beta)" in line
    # Only the first LISTEN_FDS names count.
    assert r2.returncode == 1
    assert "(LISTEN_FDNAMES: alpha)" in error_line(r2)


def test_fd_name_without_listen_fds(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    r = vmt("restore", "fd:state", env=env)
    assert r.returncode == 1
    assert "no descriptor named 'state' was passed (LISTEN_FDNAMES: none)" in error_line(r)


@pytest.mark.parametrize("command", ["save", "restore"])
def test_fd_not_open(command: str) -> None:
    r = vmt(command, "fd:87", input=b"abc")
    assert r.returncode == 1
    assert "fd:87: descriptor 87 is not open" in error_line(r)


# --- exec: ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES[:2], ids=SIZE_IDS[:2])
def test_exec_round_trip(payloads: dict[int, Path], tmp_path: Path, size: int) -> None:
    src = payloads[size]
    image = tmp_path / "vm.sav"
    with open(src, "rb") as f:
        r = vmt("save", f"exec:cat > {image}", stdin=f)
    assert r.returncode == 0, r.stderr
    assert sha(image) == sha(src)
    r = vmt("restore", f"exec:cat {image}")
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).hexdigest() == sha(src)


def test_exec_copy_through_a_pipeline(payloads: dict[int, Path], tmp_path: Path) -> None:
    src = payloads[SIZES[1]]
    packed = tmp_path / "vm.gz"
    r = vmt("copy", f"file:{src}", f"exec:gzip -1 > {packed}")
    assert r.returncode == 0, r.stderr
    assert packed.read_bytes()[:2] == b"\x1f\x8b"
    out = tmp_path / "vm.raw"
    r = vmt("copy", f"exec:gzip -dc {packed}", f"file:{out}")
    assert r.returncode == 0, r.stderr
    assert sha(out) == sha(src)


def test_exec_keeps_commas(tmp_path: Path) -> None:
    r = vmt(
        "save", f"exec:cat > '{tmp_path}/a,b' && printf x,,y > '{tmp_path}/c,,d'", input=b"payload"
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a,b").read_bytes() == b"payload"
    assert (tmp_path / "c,,d").read_bytes() == b"x,,y"
    r = vmt("restore", f"exec:cat '{tmp_path}/a,b'")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"payload"


def test_exec_failure_quotes_the_stderr_tail(tmp_path: Path) -> None:
    cmd = "cat > /dev/null; for i in 1 2 3 4 5 6 7; do echo line$i >&2; done; exit 3"
    r = vmt("save", f"exec:{cmd}", input=os.urandom(100_000))
    assert r.returncode == 1
    line = last_error_line(r)
    assert f"exec:{cmd}" in line
    assert "exited with status 3" in line
    assert "line3 | line4 | line5 | line6 | line7" in line  # the last 5 lines
    assert "line2" not in line
    # The command's stderr passed through to ours, too.
    assert r.stderr.decode().splitlines()[:7] == [f"line{i}" for i in range(1, 8)]


def test_exec_killed_by_a_signal() -> None:
    r = vmt("save", "exec:cat > /dev/null; kill -9 $$", input=b"abc")
    assert r.returncode == 1
    assert "killed by signal 9" in last_error_line(r)


@pytest.mark.parametrize("cmd", ["exit 0", "head -c 10 > /dev/null", "exit 5"])
def test_exec_command_that_stops_reading_early(cmd: str) -> None:
    start = time.monotonic()
    r = vmt("save", f"exec:{cmd}", input=os.urandom(20 * MIB))
    assert time.monotonic() - start < 20
    assert r.returncode == 1
    line = last_error_line(r)
    assert f"exec:{cmd}" in line
    assert "before taking the whole stream" in line
    assert f"exited with status {5 if cmd == 'exit 5' else 0}" in line


def test_exec_restore_from_a_failing_command() -> None:
    r = vmt("restore", "exec:echo partial; echo oops >&2; exit 4")
    assert r.returncode == 1
    line = last_error_line(r)
    assert "exited with status 4" in line
    assert "oops" in line


def test_exec_copy_from_a_failing_command_leaves_no_file(tmp_path: Path) -> None:
    image = tmp_path / "vm.sav"
    r = vmt("copy", "exec:head -c 5000000 /dev/urandom; exit 4", f"file:{image}")
    assert r.returncode == 1
    assert "exited with status 4" in last_error_line(r)
    assert not image.exists()
    assert temps(tmp_path) == []


def test_exec_save_that_fails_leaves_the_target_alone(tmp_path: Path) -> None:
    """A failing exec: in a copy destination: the source side is cleaned up too."""
    src = make_payload(tmp_path / "src", 5 * MIB)
    r = vmt("copy", f"file:{src}", "exec:head -c 1 >/dev/null; exit 2")
    assert r.returncode == 1
    assert "exited with status 2" in last_error_line(r)


async def test_exec_async_copy(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with trio.fail_after(TIMEOUT):
        stats = await vmtransport.copy("exec:printf 'hello, world'", f"file:{out}")
    assert stats.bytes == 12
    assert out.read_bytes() == b"hello, world"
    with trio.fail_after(TIMEOUT), pytest.raises(TransportError, match="exited with status 7"):
        await vmtransport.copy("exec:printf abc; exit 7", f"file:{tmp_path / 'bad'}")
    assert not (tmp_path / "bad").exists()
    assert temps(tmp_path) == []
