"""The built-in transports, both directions, through the real ``vmtransport`` command
(``save`` from stdin, ``restore`` to stdout, ``copy``) and the async API: real files,
pipes, sockets, mounts (ramfs, tmpfs) and shell commands.

save/restore/copy validate what passes as a QEMU migration stream, so the payloads are
synthetic QEMU streams (:class:`vmtransport.testing.SyntheticStream`: random RAM pages,
any length); byte-exact checks use ``format=raw`` or the byte-level API
(``open_sink``/``open_source``).
"""

from __future__ import annotations

import array
import errno
import fcntl
import hashlib
import mmap
import os
import random
import shutil
import signal
import socket
import stat
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
import trio.testing

import vmtransport
from vmtransport import TransportError
from vmtransport._buffers import fd_reader
from vmtransport._pipeline import pump_blocking
from vmtransport._usecases import REFUSED
from vmtransport.testing import SyntheticStream, cached_bytes

VMT = Path(sys.executable).parent / "vmtransport"
MIB = 1 << 20
TIMEOUT = 60
PAGE = 4096
SIZES = [3 * MIB + 1234, 50 * MIB + 4321]  # exact, and not page multiples
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


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Valid QEMU streams of exactly SIZES bytes, in files."""
    d = tmp_path_factory.mktemp("payloads")
    return {size: SyntheticStream(size=size, seed=size).write_to(d / f"p{size}") for size in SIZES}


@pytest.fixture(scope="module")
def small() -> bytes:
    """A small valid stream (3 pages)."""
    return bytes(SyntheticStream(3, seed=3))


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


@pytest.mark.parametrize(
    ("scheme", "size", "fmt"),
    [
        ("file", SIZES[0], "image"),
        ("file", SIZES[0], "raw"),
        ("odirect", SIZES[0], "image"),
        ("odirect", SIZES[1], "raw"),
    ],
    ids=["file-3MiB-image", "file-3MiB-raw", "odirect-3MiB-image", "odirect-50MiB-raw"],
)
def test_round_trip(
    payloads: dict[int, Path], disk_dir: Path, scheme: str, size: int, fmt: str
) -> None:
    src = payloads[size]
    length = src.stat().st_size
    image = disk_dir / "vm.sav"
    uri = f"{scheme}:{image}" + (",format=raw" if fmt == "raw" else "")
    with open(src, "rb") as f:
        r = vmt("save", uri, stdin=f)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    st = image.stat()
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    if fmt == "raw":
        assert st.st_size == length  # exact: no padding left from the unaligned tail
        assert sha(image) == sha(src)
    else:
        assert st.st_size > length  # the stream behind a header
        assert image.read_bytes()[:4] != b"QEVM"
    assert os.listdir(disk_dir) == ["vm.sav"]
    out = disk_dir / "restored"
    with open(out, "wb") as f:
        r = vmt("restore", f"{scheme}:{image}", stdout=f)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size == length
    assert sha(out) == sha(src)


@pytest.mark.parametrize(
    ("src_uri", "dst_uri"),
    [
        ("file:{src}", "odirect:{dst}"),
        ("odirect:{src}", "file:{dst},format=raw"),
    ],
)
def test_cli_copy(payloads: dict[int, Path], disk_dir: Path, src_uri: str, dst_uri: str) -> None:
    src = payloads[SIZES[0]]  # a bare stream: any source may hold one
    dst = disk_dir / "copy.sav"
    r = vmt("copy", src_uri.format(src=src), dst_uri.format(dst=dst))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b""
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600
    assert os.listdir(disk_dir) == ["copy.sav"]
    if "raw" in dst_uri:
        assert sha(dst) == sha(src)
    else:
        r = vmt("restore", f"file:{dst}")
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(r.stdout).hexdigest() == sha(src)


async def test_async_copy_restore_and_open_source(
    payloads: dict[int, Path], disk_dir: Path
) -> None:
    src = payloads[SIZES[1]]
    dst = disk_dir / "async.sav"
    with trio.fail_after(TIMEOUT):
        stats = await vmtransport.copy(f"file:{src}", f"odirect:{dst}")
    assert stats.bytes >= src.stat().st_size
    out = disk_dir / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with trio.fail_after(TIMEOUT):
            await vmtransport.restore(f"odirect:{dst}", fd)
    finally:
        os.close(fd)
    assert sha(out) == sha(src)
    # open_source is byte-level: it reads the image file as it is. Into a page-aligned
    # buffer, as the pump does (Source.readinto's contract: O_DIRECT reads need one).
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
    assert total == dst.stat().st_size
    assert h.hexdigest() == sha(dst)


async def test_async_save_from_fd(payloads: dict[int, Path], tmp_path: Path) -> None:
    src = payloads[SIZES[0]]
    dst = tmp_path / "saved"
    fd = os.open(src, os.O_RDONLY)
    try:
        with trio.fail_after(TIMEOUT):
            stats = await vmtransport.save(f"file:{dst},format=raw", fd)
    finally:
        os.close(fd)
    assert stats.bytes == src.stat().st_size
    assert sha(dst) == sha(src)


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 8 * MIB - 1, 8 * MIB + 1])
@pytest.mark.parametrize("scheme", ["file", "odirect"])
def test_byte_level_sinks_and_sources_keep_any_length(
    tmp_path: Path, scheme: str, size: int
) -> None:
    """Below the stream layer a transport moves bytes, whatever they are: the unaligned
    tail of an O_DIRECT save is written through a padded block and cut off again."""
    data = random.Random(size).randbytes(size)
    image = tmp_path / "vm.bin"
    sink = vmtransport.open_sink(f"{scheme}:{image}")
    r, w = os.pipe()

    def feed() -> None:
        try:
            os.write(w, data)
        finally:
            os.close(w)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        stats = pump_blocking(fd_reader(r), sink, label="test pipe")
    finally:
        feeder.join(TIMEOUT)
        os.close(r)
    assert stats.bytes == size
    assert image.stat().st_size == size
    assert image.read_bytes() == data

    async def read_back() -> bytes:
        got = bytearray()
        buf = mmap.mmap(-1, 8 * MIB)  # page aligned, as the pump's
        try:
            with trio.fail_after(TIMEOUT):
                source = await vmtransport.open_source(f"{scheme}:{image}")
                while n := await source.readinto(memoryview(buf)):
                    got += buf[:n]
                await source.commit()
        finally:
            buf.close()
        return bytes(got)

    assert trio.run(read_back) == data


def _not_a_stream(fault: str, message: str) -> pytest.MarkDecorator:
    return pytest.mark.fault(
        fault,
        direction="save",
        vm="n/a (stream from a pipe, no VM)",
        disk="nothing new; an existing image kept byte for byte",
        exit="1",
        message=message,
    )


_EMPTY = _not_a_stream("empty input", "names the URI: 'incomplete migration stream'")
_GARBAGE = _not_a_stream("3 MiB of random bytes", "names the URI: 'not a QEMU migration stream'")
_CUT = _not_a_stream("stream cut mid-RAM", "names the URI: 'incomplete migration stream'")


@pytest.mark.parametrize(
    ("scheme", "what", "existing"),
    [
        pytest.param("file", "empty", False, marks=_EMPTY),
        pytest.param("file", "garbage", True, marks=_GARBAGE),
        pytest.param("file", "truncated", False, marks=_CUT),
        pytest.param("file", "truncated", True, marks=_CUT),
        pytest.param("odirect", "truncated", True, marks=_CUT),
        pytest.param("odirect", "garbage", False, marks=_GARBAGE),
    ],
)
def test_save_of_something_not_a_complete_stream_leaves_nothing(
    tmp_path: Path, payloads: dict[int, Path], scheme: str, what: str, existing: bool
) -> None:
    image = tmp_path / "vm.sav"
    if existing:
        image.write_bytes(b"the previous image")
    data = {
        "empty": b"",
        "garbage": os.urandom(3 * MIB),
        "truncated": payloads[SIZES[0]].read_bytes()[: 2 * MIB],
    }[what]
    uri = f"{scheme}:{image}"
    r = vmt("save", uri, input=data)
    assert r.returncode == 1
    line = error_line(r)
    assert uri in line
    if what == "garbage":
        assert "not a QEMU migration stream" in line
    else:
        assert "incomplete migration stream" in line
    assert os.listdir(tmp_path) == (["vm.sav"] if existing else [])
    if existing:
        assert image.read_bytes() == b"the previous image"


def test_file_overwrite_is_0600_and_replaces(tmp_path: Path, small: bytes) -> None:
    image = tmp_path / "vm.sav"
    image.write_bytes(b"old content that is longer than the new one" * 1000)
    image.chmod(0o644)
    r = vmt("save", f"file:{image},format=raw", input=small)
    assert r.returncode == 0, r.stderr
    assert image.read_bytes() == small
    assert stat.S_IMODE(image.stat().st_mode) == 0o600


def start_save(uri: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(VMT), "save", uri], stdin=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("scheme", ["file", "odirect"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_save_is_atomic(
    tmp_path: Path, payloads: dict[int, Path], scheme: str, existing: bool
) -> None:
    image = tmp_path / "vm.sav"
    old = b"the previous image\n" * 1000
    if existing:
        image.write_bytes(old)
    data = payloads[SIZES[0]].read_bytes()
    half = len(data) // 2
    proc = start_save(f"{scheme}:{image},format=raw")
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
    assert os.listdir(tmp_path) == ["vm.sav"]


def _killed(sig: str) -> pytest.MarkDecorator:
    return pytest.mark.fault(
        f"helper {sig} mid-save",
        direction="save",
        vm="n/a (stream from a pipe, no VM)",
        disk="nothing new; an existing image kept byte for byte",
        exit="1",
        message=f"'interrupted by {sig}'",
    )


@pytest.mark.parametrize(
    ("scheme", "existing", "sig"),
    [
        pytest.param("file", False, signal.SIGTERM, marks=_killed("SIGTERM")),
        pytest.param("odirect", True, signal.SIGTERM, marks=_killed("SIGTERM")),
        pytest.param("file", True, signal.SIGINT, marks=_killed("SIGINT")),
        pytest.param("odirect", False, signal.SIGHUP, marks=_killed("SIGHUP")),
    ],
    ids=["file-new-TERM", "odirect-overwrite-TERM", "file-overwrite-INT", "odirect-new-HUP"],
)
def test_killed_save_leaves_nothing(
    tmp_path: Path, payloads: dict[int, Path], scheme: str, existing: bool, sig: signal.Signals
) -> None:
    image = tmp_path / "vm.sav"
    old = b"the previous image\n" * 1000
    if existing:
        image.write_bytes(old)
    proc = start_save(f"{scheme}:{image}")
    try:
        assert proc.stdin is not None
        # More than a pump buffer of a valid stream: some of it is written.
        proc.stdin.write(payloads[SIZES[1]].read_bytes()[: 20 * MIB])
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
@pytest.mark.fault(
    "helper SIGKILL mid-save",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="the old image kept byte for byte; no temporary (O_TMPFILE)",
    exit="killed by SIGKILL",
    message="none (killed)",
)
def test_sigkilled_save_leaves_nothing_where_there_is_o_tmpfile(
    tmp_path: Path, payloads: dict[int, Path], scheme: str
) -> None:
    if not has_tmpfile(tmp_path):
        pytest.skip(f"{fs_type(tmp_path)} has no O_TMPFILE: a SIGKILL leaves a named temporary")
    image = tmp_path / "vm.sav"
    image.write_bytes(b"old")
    proc = start_save(f"{scheme}:{image}")
    try:
        assert proc.stdin is not None
        proc.stdin.write(payloads[SIZES[1]].read_bytes()[: 20 * MIB])
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


@pytest.mark.parametrize(
    "command",
    [
        pytest.param("restore", marks=pytest.mark.fault(
            "helper SIGTERM mid-restore while QEMU stops reading", direction="restore",
            vm="n/a (a pipe nobody reads)", disk="n/a", exit="1",
            message="'interrupted by SIGTERM'",
        )),
        pytest.param("save", marks=pytest.mark.fault(
            "helper SIGTERM mid-save while the fd: consumer stops reading", direction="save",
            vm="n/a (stream from a file, no VM)", disk="n/a", exit="1",
            message="'interrupted by SIGTERM'",
        )),
    ],
)  # fmt: skip
def test_sigterm_is_heeded_when_the_consumer_stalls(
    tmp_path: Path, payloads: dict[int, Path], command: str
) -> None:
    """A consumer that keeps its pipe open but stops reading (a stopped QEMU) must not
    keep the helper alive after SIGTERM."""
    # restore: more than the pump's pool holds, so the reader is stuck too and the writer
    # is given up after a grace period; save: less, so the signal interrupts the final wait
    # for the writer.
    stream = payloads[SIZES[1] if command == "restore" else SIZES[0]]
    rfd, wfd = os.pipe()
    args: list[str]
    fds: tuple[int, ...]
    stdin: int
    stdout: int | None
    try:
        if command == "restore":
            args, fds, stdin, stdout = [f"file:{stream}"], (), subprocess.DEVNULL, wfd
        else:
            args, fds, stdin, stdout = [f"fd:{wfd}"], (wfd,), os.open(stream, os.O_RDONLY), None
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


@pytest.mark.fault(
    "helper SIGTERM mid-copy",
    direction="copy",
    vm="n/a",
    disk="nothing in the target directory",
    exit="1",
    message="'interrupted by SIGTERM'",
)
def test_killed_copy_leaves_nothing(tmp_path: Path, payloads: dict[int, Path]) -> None:
    """The async path (copy) turns SIGTERM into cancellation and cleans up too."""
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
            os.write(w, payloads[SIZES[0]].read_bytes()[:MIB])
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


@pytest.mark.fault(
    "target is a symlink to another file",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="the symlink replaced by the image; its target untouched",
    exit="0",
    message="none",
)
def test_symlink_is_replaced_not_followed(tmp_path: Path, small: bytes) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"must stay")
    link = tmp_path / "vm.sav"
    link.symlink_to(victim)
    r = vmt("save", f"file:{link},format=raw", input=small)
    assert r.returncode == 0, r.stderr
    assert not link.is_symlink()
    assert link.read_bytes() == small
    assert victim.read_bytes() == b"must stay"


@pytest.mark.fault(
    "target is a dangling symlink",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="the symlink replaced; nothing created where it pointed",
    exit="0",
    message="none",
)
def test_dangling_symlink_is_replaced(tmp_path: Path, small: bytes) -> None:
    link = tmp_path / "vm.sav"
    link.symlink_to(tmp_path / "nowhere")
    r = vmt("save", f"file:{link}", input=small)
    assert r.returncode == 0, r.stderr
    assert not link.is_symlink()
    assert not (tmp_path / "nowhere").exists()
    r = vmt("restore", f"file:{link}")
    assert r.stdout == small


@pytest.mark.parametrize(
    ("scheme", "offset", "fmt"),
    [("file", 1000, "raw"), ("odirect", 8192, "raw"), ("file", 4096, "image")],
)
def test_offset_keeps_the_prefix(
    tmp_path: Path, payloads: dict[int, Path], scheme: str, offset: int, fmt: str
) -> None:
    image = tmp_path / "vm.sav"
    prefix = os.urandom(offset)
    image.write_bytes(prefix + b"J" * 100_000)  # junk after the prefix goes away
    stream = payloads[SIZES[0]].read_bytes()
    uri = f"{scheme}:{image},offset={offset}"
    r = vmt("save", uri + (",format=raw" if fmt == "raw" else ""), input=stream)
    assert r.returncode == 0, r.stderr
    content = image.read_bytes()
    assert content[:offset] == prefix
    if fmt == "raw":
        assert content[offset:] == stream
    r = vmt("restore", uri)
    assert r.returncode == 0, r.stderr
    assert r.stdout == stream
    if scheme == "file" and fmt == "raw":
        # Without the offset the prefix is in the way.
        r = vmt("restore", f"{scheme}:{image}")
        assert r.returncode == 1
        assert "neither a QEMU migration stream" in error_line(r)


@pytest.mark.parametrize("scheme", ["file", "odirect"])
def test_offset_into_a_missing_or_short_file_pads_with_zeros(
    tmp_path: Path, small: bytes, scheme: str
) -> None:
    missing = tmp_path / "new.sav"
    r = vmt("save", f"{scheme}:{missing},offset=4096,format=raw", input=small)
    assert r.returncode == 0, r.stderr
    assert missing.read_bytes() == bytes(4096) + small
    short = tmp_path / "short.sav"
    short.write_bytes(b"abc")
    r = vmt("save", f"{scheme}:{short},offset=8192,format=raw", input=small)
    assert r.returncode == 0, r.stderr
    assert short.read_bytes() == b"abc" + bytes(8189) + small


@pytest.mark.parametrize("scheme", ["file", "odirect"])
@pytest.mark.fault(
    "target directory missing",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="nothing created",
    exit="1",
    message="names the URI: 'does not exist'",
)
def test_save_into_missing_directory(tmp_path: Path, small: bytes, scheme: str) -> None:
    uri = f"{scheme}:{tmp_path}/no/such/dir/vm.sav"
    r = vmt("save", uri, input=small)
    assert r.returncode == 1
    line = error_line(r)
    assert uri in line
    assert "does not exist" in line
    assert not (tmp_path / "no").exists()


@pytest.mark.fault(
    "target is a directory",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="not checked",
    exit="1",
    message="'is a directory'",
)
def test_save_onto_a_directory(tmp_path: Path, small: bytes) -> None:
    r = vmt("save", f"file:{tmp_path}", input=small)
    assert r.returncode == 1
    assert "is a directory" in error_line(r)


@pytest.mark.parametrize("scheme", ["file", "odirect"])
@pytest.mark.fault(
    "image missing",
    direction="restore",
    vm="QEMU gets the refusal marker, not a stream",
    disk="n/a",
    exit="1",
    message="names the URI: 'No such file or directory'",
)
def test_restore_missing_file(tmp_path: Path, scheme: str) -> None:
    uri = f"{scheme}:{tmp_path}/absent.sav"
    r = vmt("restore", uri)
    assert r.returncode == 1
    line = error_line(r)
    assert uri in line
    assert "No such file or directory" in line
    assert r.stdout == REFUSED


def save_to_fifo(tmp_path: Path, data: bytes, options: str) -> tuple[int, bytes, bytes]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as f:
            got.append(f.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    r = vmt("save", f"file:{fifo}{options}", input=data)
    reader.join(TIMEOUT)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["fifo"]
    return r.returncode, got[0] if got else b"", r.stderr


def test_save_to_a_fifo_writes_in_place(tmp_path: Path, payloads: dict[int, Path]) -> None:
    data = payloads[SIZES[0]].read_bytes()
    code, got, err = save_to_fifo(tmp_path, data, ",format=raw")
    assert code == 0, err
    assert got == data


def test_save_to_a_fifo_in_the_default_format(tmp_path: Path, small: bytes) -> None:
    """A FIFO cannot take an image's header rewrite: the default falls back to raw."""
    code, got, err = save_to_fifo(tmp_path, small, "")
    assert code == 0, err
    assert got == small


# --- odirect: -------------------------------------------------------------------------------


def test_odirect_leaves_no_page_cache(disk_dir: Path) -> None:
    src = SyntheticStream(size=64 * MIB + 99).write_to(disk_dir / "src")
    size = src.stat().st_size
    image = disk_dir / "direct.sav"
    with open(src, "rb") as f:
        r = vmt("save", f"odirect:{image}", stdin=f)
    assert r.returncode == 0, r.stderr
    cached, total = cached_bytes(image)
    assert total >= size
    assert cached <= total // 100, f"{cached} of {total} bytes cached after an odirect save"
    out = disk_dir / "out"
    with open(out, "wb") as f:
        r = vmt("restore", f"odirect:{image}", stdout=f)
    assert r.returncode == 0, r.stderr
    cached, _ = cached_bytes(image)
    assert cached <= total // 100, f"{cached} of {total} bytes cached after an odirect restore"
    assert sha(out) == sha(src)
    # Control: the same through file: does fill the cache, so the measurement means something.
    with open(os.devnull, "wb") as null:
        r = vmt("restore", f"file:{image}", stdout=null)
    assert r.returncode == 0, r.stderr
    cached, _ = cached_bytes(image)
    assert cached > total // 2


@pytest.mark.parametrize("tail", [0, 1, 2049, 4095])
def test_odirect_unaligned_stream_tails(tmp_path: Path, tail: int) -> None:
    """Streams whose length ends anywhere in a 4 KiB block: the file is exactly as long."""
    stream = bytes(SyntheticStream(size=5 * PAGE + 4096 + tail, seed=tail))
    image = tmp_path / "vm.sav"
    r = vmt("save", f"odirect:{image},format=raw", input=stream)
    assert r.returncode == 0, r.stderr
    assert image.stat().st_size == len(stream)
    assert image.read_bytes() == stream
    r = vmt("restore", f"odirect:{image}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == stream


@pytest.mark.parametrize("offset", [0, 8192])
@pytest.mark.parametrize("fmt", ["image", "raw"])
def test_odirect_write_behind_keeps_every_byte(tmp_path: Path, offset: int, fmt: str) -> None:
    """A save with two O_DIRECT writes in flight (many 8 MiB buffers, a short last one,
    a prefix to keep): every byte lands where it belongs."""
    stream = bytes(SyntheticStream(size=45 * MIB + 12345, seed=offset))
    image = tmp_path / "vm.sav"
    image.write_bytes(b"P" * offset)
    r = vmt("save", f"odirect:{image},offset={offset},format={fmt}", input=stream)
    assert r.returncode == 0, r.stderr
    data = image.read_bytes()
    assert data[:offset] == b"P" * offset
    payload = data[offset + (0 if fmt == "raw" else 64 * 1024) :]
    assert len(payload) == len(stream)
    assert payload == stream
    r = vmt("restore", f"odirect:{image},offset={offset}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == stream


def test_odirect_writes_in_flight_return_once_the_previous_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmtransport.transports._odirect import _InFlight

    gate = threading.Event()
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: memoryview, pos: int) -> int:
        if pos == 0 and not gate.wait(TIMEOUT):
            raise OSError(errno.EIO, "gate never opened")
        if pos == 3 * PAGE:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, pos)

    monkeypatch.setattr(os, "pwrite", pwrite)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    flight = _InFlight(fd)
    try:
        flight.submit(memoryview(b"a" * PAGE), 0)  # nothing before it: returns at once
        second = threading.Thread(target=flight.submit, args=(memoryview(b"b" * PAGE), PAGE))
        second.start()
        second.join(0.2)
        assert second.is_alive()  # waits for the first, which the gate holds
        gate.set()
        second.join(TIMEOUT)
        assert not second.is_alive()
        flight.submit(memoryview(b"c" * PAGE), 2 * PAGE)
        flight.submit(memoryview(b"d" * PAGE), 3 * PAGE)  # fails in its thread...
        with pytest.raises(OSError, match="No space left"):
            flight.submit(memoryview(b"e" * PAGE), 4 * PAGE)  # ...reported here
        flight.drain()
    finally:
        gate.set()
        flight.close()
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"".join(
        c * PAGE for c in (b"a", b"b", b"c", b"\0", b"e")
    )


@pytest.mark.parametrize(
    "via",
    [
        pytest.param(via, marks=pytest.mark.fault(
            "O_DIRECT refused (ramfs): buffered fallback", direction=via,
            vm="n/a (stream from a file, no VM)", disk="the image, 0600, nothing else", exit="0",
            message="one WARNING line naming the URI and O_DIRECT (restore: one line too)",
        ))
        for via in ("save", "copy")
    ],
)  # fmt: skip
@root_only
def test_odirect_fallback_on_ramfs(
    mounter: Callable[..., Path], payloads: dict[int, Path], via: str
) -> None:
    mnt = mounter("ramfs")
    src = payloads[SIZES[0]]
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
    assert stat.S_IMODE((mnt / "vm.sav").stat().st_mode) == 0o600
    assert os.listdir(mnt) == ["vm.sav"]
    # Restore falls back the same way, with one warning.
    r = vmt("restore", uri)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "O_DIRECT" in lines[0]
    assert hashlib.sha256(r.stdout).hexdigest() == sha(src)


@root_only
@pytest.mark.fault(
    "O_DIRECT refused (ramfs), at an offset",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="prefix kept, stream written after it",
    exit="0",
    message="none checked",
)
def test_odirect_fallback_offset_on_ramfs(mounter: Callable[..., Path], small: bytes) -> None:
    mnt = mounter("ramfs")
    image = mnt / "vm.sav"
    prefix = os.urandom(4096)
    image.write_bytes(prefix)
    r = vmt("save", f"odirect:{image},offset=4096,format=raw", input=small)
    assert r.returncode == 0, r.stderr
    assert image.read_bytes() == prefix + small
    r = vmt("restore", f"odirect:{image},offset=4096")
    assert r.returncode == 0, r.stderr
    assert r.stdout == small


@root_only
@pytest.mark.fault(
    "O_DIRECT refused (ramfs), fallback=error",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="nothing on the mount",
    exit="1",
    message="names the URI: 'refuses O_DIRECT', 'fallback=error'",
)
@pytest.mark.fault(
    "O_DIRECT refused (ramfs), fallback=error",
    direction="restore",
    vm="QEMU gets the refusal marker, not a stream",
    disk="n/a",
    exit="1",
    message="'refuses O_DIRECT'",
)
def test_odirect_fallback_error_on_ramfs(mounter: Callable[..., Path], small: bytes) -> None:
    mnt = mounter("ramfs")
    uri = f"odirect:{mnt}/vm.sav,fallback=error"
    r = vmt("save", uri, input=small)
    assert r.returncode == 1
    line = error_line(r)
    assert uri in line
    assert "refuses O_DIRECT" in line
    assert "fallback=error" in line
    assert os.listdir(mnt) == []
    (mnt / "vm.sav").write_bytes(small)
    r = vmt("restore", uri)
    assert r.returncode == 1
    assert "refuses O_DIRECT" in error_line(r)
    assert r.stdout == REFUSED


@root_only
def test_odirect_on_tmpfs_needs_no_fallback(
    mounter: Callable[..., Path], payloads: dict[int, Path]
) -> None:
    mnt = mounter("tmpfs", "size=64m")
    src = payloads[SIZES[0]]
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
    r = vmt("restore", uri)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    assert hashlib.sha256(r.stdout).hexdigest() == sha(src)


@pytest.mark.parametrize(
    "via",
    [
        pytest.param(via, marks=pytest.mark.fault(
            "disk full mid-payload (tmpfs of 8 MiB, 50 MiB stream)", direction=via,
            vm="n/a (stream from a file, no VM)", disk="nothing on the mount", exit="1",
            message="names the URI: 'No space left on device'",
        ))
        for via in ("save", "copy")
    ],
)  # fmt: skip
@pytest.mark.parametrize("scheme", ["file", "odirect"])
@root_only
def test_disk_full(
    mounter: Callable[..., Path], payloads: dict[int, Path], scheme: str, via: str
) -> None:
    mnt = mounter("tmpfs", "size=8m")
    src = payloads[SIZES[1]]
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
    assert os.listdir(mnt) == []


@root_only
@pytest.mark.fault(
    "disk full mid-payload, over an existing image (odirect:, tmpfs 8 MiB)",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="the old image kept byte for byte; nothing else",
    exit="1",
    message="'No space left on device'",
)
def test_disk_full_keeps_the_old_image(
    mounter: Callable[..., Path], payloads: dict[int, Path]
) -> None:
    mnt = mounter("tmpfs", "size=8m")
    image = mnt / "vm.sav"
    old = os.urandom(MIB)
    image.write_bytes(old)
    r = vmt("save", f"odirect:{image}", input=payloads[SIZES[1]].read_bytes()[: 12 * MIB])
    assert r.returncode == 1
    assert "No space left on device" in error_line(r)
    assert image.read_bytes() == old
    assert os.listdir(mnt) == ["vm.sav"]


# --- fd: -----------------------------------------------------------------------------------


def test_fd_number_save_and_restore_regular_file(payloads: dict[int, Path], tmp_path: Path) -> None:
    src = payloads[SIZES[0]]
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
    src = payloads[SIZES[0]]
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
    src = payloads[SIZES[0]]
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
    data = payloads[SIZES[0]].read_bytes()
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
    """The source parks on the event loop while the pipe is empty (it neither spins nor
    blocks the thread: trio sees every task blocked), takes what arrives as it arrives,
    and ends at EOF."""
    data = os.urandom(3 * MIB + 1)
    rfd, wfd = os.pipe()
    got = bytearray()

    async def consume() -> None:
        buf = bytearray(100_000)
        while n := await source.readinto(memoryview(buf)):
            got.extend(buf[:n])

    def produce_the_rest() -> None:
        try:
            os.write(wfd, data[1000:])  # more than the pipe holds: the reader must keep up
        finally:
            os.close(wfd)

    with trio.fail_after(TIMEOUT):
        source = await vmtransport.open_source(f"fd:{rfd}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await trio.testing.wait_all_tasks_blocked()
            assert got == b""  # waiting for data
            os.write(wfd, data[:1000])
            await trio.testing.wait_all_tasks_blocked()
            assert got == data[:1000]  # read at once, and waiting again
            await trio.to_thread.run_sync(produce_the_rest)
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
    data = bytes(SyntheticStream(300, seed=7))
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


@pytest.mark.fault(
    "fd:NAME with LISTEN_PID of another process",
    direction="cli",
    vm="n/a",
    disk="nothing written to the descriptor",
    exit="1",
    message="'LISTEN_PID=1 is not this process'",
)
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


@pytest.mark.fault(
    "fd:NAME not passed",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="1",
    message="'no descriptor named ...' with the names passed",
)
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


@pytest.mark.fault(
    "fd:NAME without LISTEN_FDS",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="1",
    message="'(LISTEN_FDNAMES: none)'",
)
def test_fd_name_without_listen_fds(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    r = vmt("restore", "fd:state", env=env)
    assert r.returncode == 1
    assert "no descriptor named 'state' was passed (LISTEN_FDNAMES: none)" in error_line(r)


@pytest.mark.parametrize("command", ["save", "restore"])
@pytest.mark.fault(
    "fd:N not open",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="1",
    message="'descriptor 87 is not open'",
)
def test_fd_not_open(command: str) -> None:
    r = vmt(command, "fd:87", input=b"abc")
    assert r.returncode == 1
    assert "fd:87: descriptor 87 is not open" in error_line(r)


# --- exec: ---------------------------------------------------------------------------------


def test_exec_round_trip(payloads: dict[int, Path], tmp_path: Path) -> None:
    src = payloads[SIZES[0]]
    image = tmp_path / "vm.sav"
    with open(src, "rb") as f:
        r = vmt("save", f"exec:cat > {image}", stdin=f)
    assert r.returncode == 0, r.stderr
    assert sha(image) == sha(src)  # exec: gets the bare stream
    r = vmt("restore", f"exec:cat {image}")
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).hexdigest() == sha(src)


def test_exec_copy_through_a_pipeline(payloads: dict[int, Path], tmp_path: Path) -> None:
    src = payloads[SIZES[0]]
    packed = tmp_path / "vm.gz"
    r = vmt("copy", f"file:{src}", f"exec:gzip -1 > {packed}")
    assert r.returncode == 0, r.stderr
    assert packed.read_bytes()[:2] == b"\x1f\x8b"
    out = tmp_path / "vm.raw"
    r = vmt("copy", f"exec:gzip -dc {packed}", f"file:{out},format=raw")
    assert r.returncode == 0, r.stderr
    assert sha(out) == sha(src)


def test_exec_keeps_commas(tmp_path: Path, small: bytes) -> None:
    r = vmt("save", f"exec:cat > '{tmp_path}/a,b' && printf x,,y > '{tmp_path}/c,,d'", input=small)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a,b").read_bytes() == small
    assert (tmp_path / "c,,d").read_bytes() == b"x,,y"
    r = vmt("restore", f"exec:cat '{tmp_path}/a,b'")
    assert r.returncode == 0, r.stderr
    assert r.stdout == small


@pytest.mark.fault(
    "exec: command fails after taking the stream",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="n/a",
    exit="1",
    message="'exited with status 3' and the last 5 lines of its stderr",
)
def test_exec_failure_quotes_the_stderr_tail(small: bytes) -> None:
    cmd = "cat > /dev/null; for i in 1 2 3 4 5 6 7; do echo line$i >&2; done; exit 3"
    r = vmt("save", f"exec:{cmd}", input=small)
    assert r.returncode == 1
    line = last_error_line(r)
    assert f"exec:{cmd}" in line
    assert "exited with status 3" in line
    assert "line3 | line4 | line5 | line6 | line7" in line  # the last 5 lines
    assert "line2" not in line
    # The command's stderr passed through to ours, too.
    assert r.stderr.decode().splitlines()[:7] == [f"line{i}" for i in range(1, 8)]


@pytest.mark.fault(
    "exec: command killed by a signal",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="n/a",
    exit="1",
    message="'killed by signal 9'",
)
def test_exec_killed_by_a_signal(small: bytes) -> None:
    r = vmt("save", "exec:cat > /dev/null; kill -9 $$", input=small)
    assert r.returncode == 1
    assert "killed by signal 9" in last_error_line(r)


@pytest.mark.parametrize("cmd", ["exit 0", "head -c 10 > /dev/null", "exit 5"])
@pytest.mark.fault(
    "exec: command stops reading early (exits 0 or 5)",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="n/a",
    exit="1 within 20 s",
    message="'before taking the whole stream', its exit status",
)
def test_exec_command_that_stops_reading_early(payloads: dict[int, Path], cmd: str) -> None:
    start = time.monotonic()
    with open(payloads[SIZES[1]], "rb") as f:
        r = vmt("save", f"exec:{cmd}", stdin=f)
    assert time.monotonic() - start < 20
    assert r.returncode == 1
    line = last_error_line(r)
    assert f"exec:{cmd}" in line
    assert "before taking the whole stream" in line
    assert f"exited with status {5 if cmd == 'exit 5' else 0}" in line


@pytest.mark.fault(
    "exec: source command fails",
    direction="restore",
    vm="not checked",
    disk="n/a",
    exit="1",
    message="'exited with status 4' and its stderr",
)
def test_exec_restore_from_a_failing_command(tmp_path: Path, small: bytes) -> None:
    (tmp_path / "s").write_bytes(small)
    r = vmt("restore", f"exec:cat {tmp_path}/s; echo oops >&2; exit 4")
    assert r.returncode == 1
    line = last_error_line(r)
    assert "exited with status 4" in line
    assert "oops" in line


@pytest.mark.fault(
    "exec: source gives something that is not a stream",
    direction="restore",
    vm="QEMU gets the refusal marker, not a stream",
    disk="n/a",
    exit="1",
    message="'neither a QEMU migration stream'",
)
def test_exec_restore_of_something_else() -> None:
    r = vmt("restore", "exec:echo partial")
    assert r.returncode == 1
    assert "neither a QEMU migration stream" in last_error_line(r)
    assert r.stdout == REFUSED


@pytest.mark.fault(
    "exec: source fails after a whole valid stream",
    direction="copy",
    vm="n/a",
    disk="nothing in the target directory",
    exit="1",
    message="'exited with status 4'",
)
def test_exec_copy_from_a_failing_command_leaves_no_file(
    tmp_path: Path, payloads: dict[int, Path]
) -> None:
    image = tmp_path / "vm.sav"
    # The whole, valid stream, and then the command reports failure.
    r = vmt("copy", f"exec:cat {payloads[SIZES[0]]}; exit 4", f"file:{image}")
    assert r.returncode == 1
    assert "exited with status 4" in last_error_line(r)
    assert os.listdir(tmp_path) == []


@pytest.mark.fault(
    "exec: target command fails",
    direction="copy",
    vm="n/a",
    disk="n/a",
    exit="1",
    message="'exited with status 2'",
)
def test_exec_copy_into_a_failing_command(tmp_path: Path, payloads: dict[int, Path]) -> None:
    r = vmt("copy", f"file:{payloads[SIZES[1]]}", "exec:head -c 1 >/dev/null; exit 2")
    assert r.returncode == 1
    assert "exited with status 2" in last_error_line(r)


async def test_exec_async_copy(tmp_path: Path, small: bytes) -> None:
    (tmp_path / "s").write_bytes(small)
    out = tmp_path / "out"
    with trio.fail_after(TIMEOUT):
        await vmtransport.copy(f"exec:cat {tmp_path}/s", f"file:{out},format=raw")
    assert out.read_bytes() == small
    with trio.fail_after(TIMEOUT), pytest.raises(TransportError, match="exited with status 7"):
        await vmtransport.copy(f"exec:cat {tmp_path}/s; exit 7", f"file:{tmp_path / 'bad'}")
    assert sorted(os.listdir(tmp_path)) == ["out", "s"]


# --- page lending (vmsplice) only to QEMU's own exec: channel ------------------------------

#: run with stdout on a pipe: says whether a restore's stdout sink would lend pages
_LENDS_PROBE = (
    "import sys; from vmtransport._io import FdSink; s = FdSink(1, 'o', close=False); "
    "sys.stderr.write('lends' if s._splice is not None else 'copies')"
)

_FAKE_QEMU = """
import os, subprocess, sys
helper, keep = sys.argv[1], sys.argv[2]
r, w = os.pipe()
if keep == "write-end-only":  # someone else reads: QEMU only holds the write end
    reader = subprocess.Popen(["cat"], stdin=r, stdout=subprocess.DEVNULL)
    os.close(r)
p = subprocess.run(["/bin/sh", "-c", helper], stdout=w, stderr=subprocess.PIPE)
sys.stdout.write(p.stderr.decode())
"""


@pytest.mark.parametrize(
    ("wrapper", "keep", "lends"),
    [
        ("", "read-end", True),  # exec:vmtransport restore ...
        ("exec ", "read-end", True),
        ("/usr/bin/time -o /dev/null ", "read-end", True),  # dash forks for these
        ("nice /usr/bin/time -o /dev/null ", "read-end", True),
        ("", "write-end-only", False),
    ],
)
def test_pages_are_lent_only_to_the_qemu_that_reads_the_pipe(
    tmp_path: Path, wrapper: str, keep: str, lends: bool
) -> None:
    """A restore lends its pages to the pipe (vmsplice) only when the QEMU that started
    it, however many wrappers up, holds the pipe's read end: QEMU copies what it reads."""
    fake = tmp_path / "qemu-system-x86_64"  # what the check recognises QEMU by
    shutil.copy(os.path.realpath(sys.executable), fake)
    helper = f"{wrapper}{sys.executable} -c \"{_LENDS_PROBE}\""
    script = tmp_path / "qemu.py"
    script.write_text(_FAKE_QEMU)
    out = subprocess.run(
        [str(fake), str(script), helper, keep], capture_output=True, timeout=60, check=True
    )
    assert out.stdout.decode() == ("lends" if lends else "copies")


def test_a_process_that_is_not_qemu_gets_copies() -> None:
    r, w = os.pipe()
    try:
        out = subprocess.run(
            [sys.executable, "-c", _LENDS_PROBE], stdout=w, stderr=subprocess.PIPE, timeout=60
        )
    finally:
        os.close(r)
        os.close(w)
    assert out.stderr.decode() == "copies"
