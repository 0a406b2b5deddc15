"""A save exits 0 only if its consumer took the whole stream (issue 11): ``exec:``
commands and ``fd:`` pipes and sockets, read by real commands and real descriptors,
through the real ``vmtransport save``; the waits' stall limit and cancellation on the
sink itself."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from helpers import TIMEOUT, VMT, one_error_line

import vmtransport
from vmtransport import Interrupted, TransportError
from vmtransport._io import FdSink
from vmtransport.testing import SyntheticStream

SIOCOUTQ = 0x5411


@pytest.fixture(scope="module")
def stream() -> bytes:
    """Small enough for a pipe (grown to 1 MiB) and a Unix socket's buffer to hold whole:
    the case where no write can notice a consumer that stopped early."""
    data = bytes(SyntheticStream(pages=20))
    assert 64 * 1024 < len(data) < 100 * 1024
    return data


@pytest.fixture
def stream_file(tmp_path: Path, stream: bytes) -> Path:
    path = tmp_path / "stream"
    path.write_bytes(stream)
    return path


_started: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_helper_left() -> Iterator[None]:
    """Kill what a failed test left running."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def save(uri: str, stdin: Path, pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """Start ``vmtransport save URI`` reading ``stdin`` (a file)."""
    with open(stdin, "rb") as f:
        proc = subprocess.Popen(
            [str(VMT), "save", uri], stdin=f, stderr=subprocess.PIPE, pass_fds=pass_fds
        )
    _started.append(proc)
    return proc


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, bytes]:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def queued(fd: int, request: int = termios.FIONREAD) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, request, buf)
    return int.from_bytes(buf, "little")


def wait_until(cond: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def pipe() -> Iterator[list[int]]:
    """[read end, write end]; an end set to -1 has been closed by the test."""
    ends = list(os.pipe())
    yield ends
    for fd in ends:
        if fd >= 0:
            os.close(fd)


def close(ends: list[int], i: int) -> None:
    os.close(ends[i])
    ends[i] = -1


# --- exec: -----------------------------------------------------------------------------------


@pytest.mark.fault(
    "exec: consumer exits 0 after 100 bytes (head -c 100)",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="the consumer's 100 bytes only",
    exit="1",
    message="'the command exited 0 but left N bytes of the stream unread'",
)
def test_exec_command_that_stops_reading_fails(
    tmp_path: Path, stream_file: Path, stream: bytes
) -> None:
    out = tmp_path / "f"
    uri = f"exec:head -c 100 > {out}"
    code, err = finish(save(uri, stream_file))
    assert code == 1
    assert one_error_line(err) == (
        f"vmtransport: error: {uri}: the command exited 0 but left {len(stream) - 100} bytes "
        "of the stream unread"
    )
    assert out.read_bytes() == stream[:100]


@pytest.mark.fault(
    "exec: consumer stops reading and exits 3",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="n/a",
    exit="1",
    message="'command exited with status 3 before taking the whole stream' and its stderr",
)
def test_exec_command_that_stops_reading_and_fails_reports_its_status(
    tmp_path: Path, stream_file: Path
) -> None:
    uri = f"exec:head -c 100 > {tmp_path / 'f'}; echo gave up >&2; exit 3"
    code, err = finish(save(uri, stream_file))
    assert code == 1
    lines = err.decode().splitlines()
    assert lines[0] == "gave up"  # the command's own stderr passes through
    assert lines[1:] == [
        f"vmtransport: error: {uri}: command exited with status 3 before taking the whole "
        "stream: gave up"
    ]


def test_exec_command_that_reads_everything_succeeds(
    tmp_path: Path, stream_file: Path, stream: bytes
) -> None:
    out = tmp_path / "f"
    # It reads the last bytes only well after the helper wrote them: commit waits.
    code, err = finish(save(f"exec:sleep 1; cat > {out}", stream_file))
    assert code == 0, err
    assert out.read_bytes() == stream


@pytest.mark.fault(
    "helper SIGTERM mid-save while the exec: consumer does not read",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="n/a",
    exit="1 within 10 s",
    message="'interrupted by SIGTERM'",
)
def test_exec_sigterm_ends_the_wait_for_a_command_that_does_not_read(
    stream_file: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "started"
    proc = save(f"exec:touch {marker}; exec sleep 60", stream_file)
    wait_until(marker.exists, "the command")
    time.sleep(0.5)  # the stream is in the pipe: the helper waits in commit
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    code, err = finish(proc)
    assert time.monotonic() - start < 10
    assert code == 1
    assert one_error_line(err) == "vmtransport: error: interrupted by SIGTERM"


# --- fd: on a pipe ---------------------------------------------------------------------------


@pytest.mark.fault(
    "fd: pipe reader stops after 100 bytes",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="n/a",
    exit="1",
    message="names the URI: the reader closed the pipe with N bytes unread",
)
def test_fd_pipe_reader_that_stops_early_fails(
    pipe: list[int], stream_file: Path, stream: bytes
) -> None:
    wfd = pipe[1]
    proc = save(f"fd:{wfd}", stream_file, pass_fds=(wfd,))
    close(pipe, 1)
    # The whole stream fits in the pipe: no write of the helper's can fail.
    wait_until(lambda: queued(pipe[0]) == len(stream), "the stream in the pipe")
    got = b""
    while len(got) < 100:
        got += os.read(pipe[0], 100 - len(got))
    close(pipe, 0)
    code, err = finish(proc)
    assert code == 1
    assert got == stream[:100]
    assert one_error_line(err) == (
        f"vmtransport: error: fd:{wfd}: the reader closed the pipe with "
        f"{len(stream) - 100} bytes of the stream unread"
    )


@pytest.mark.fault(
    "fd: pipe read by a command that exits 0 early",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="n/a",
    exit="1",
    message="'the reader closed the pipe with ...'",
)
def test_fd_pipe_read_by_a_command_that_stops_early_fails(
    pipe: list[int], stream_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "f"
    with open(out, "wb") as f:
        head = subprocess.Popen(["head", "-c", "100"], stdin=pipe[0], stdout=f)
    close(pipe, 0)
    proc = save(f"fd:{pipe[1]}", stream_file, pass_fds=(pipe[1],))
    close(pipe, 1)
    code, err = finish(proc)
    assert head.wait(TIMEOUT) == 0
    assert code == 1
    assert "the reader closed the pipe with" in one_error_line(err)
    assert out.stat().st_size == 100


def test_fd_pipe_read_to_the_end_succeeds(
    pipe: list[int], stream_file: Path, stream: bytes
) -> None:
    proc = save(f"fd:{pipe[1]}", stream_file, pass_fds=(pipe[1],))
    close(pipe, 1)
    wait_until(lambda: queued(pipe[0]) == len(stream), "the stream in the pipe")
    time.sleep(0.5)
    assert proc.poll() is None  # written, but not read yet: no success so far
    got = b""
    while chunk := os.read(pipe[0], 1 << 20):
        got += chunk
    code, err = finish(proc)
    assert code == 0, err
    assert got == stream


@pytest.mark.fault(
    "fd: pipe nobody reads",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="n/a",
    exit="fails after the stall limit (0.3-5 s)",
    message="names the URI and the bytes left in the pipe",
)
def test_fd_pipe_nobody_reads_stalls_then_fails(
    pipe: list[int], stream: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("vmtransport._io.DRAIN_STALL", 0.3)
    sink = vmtransport.open_sink(f"fd:{pipe[1]}")
    sink.write(memoryview(stream))
    start = time.monotonic()
    with pytest.raises(TransportError) as info:
        sink.commit()
    assert 0.3 <= time.monotonic() - start < 5
    assert str(info.value) == (
        f"fd:{pipe[1]}: the reader stopped taking the stream before its end "
        "(nothing taken for 0.3 s)"
    )
    sink.abort()
    pipe[1] = -1  # closed by the sink
    assert queued(pipe[0]) == len(stream)


@pytest.mark.fault(
    "cancel() while waiting for an fd: pipe's reader",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="n/a",
    exit="Interrupted raised",
    message="'fd:x: cancelled'",
)
def test_fd_pipe_cancel_ends_the_wait(pipe: list[int], stream: bytes) -> None:
    sink = FdSink(pipe[1], "fd:x", close=False, confirm=True)
    sink.write(memoryview(stream))
    errors: list[BaseException] = []

    def commit() -> None:
        try:
            sink.commit()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=commit)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()
    sink.cancel()
    t.join(5)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], Interrupted)
    assert str(errors[0]) == "fd:x: cancelled"


@pytest.mark.fault(
    "helper SIGTERM mid-save while waiting for an fd: pipe's reader",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="n/a",
    exit="1",
    message="'interrupted by SIGTERM'",
)
def test_fd_pipe_sigterm_ends_the_wait(pipe: list[int], stream_file: Path, stream: bytes) -> None:
    proc = save(f"fd:{pipe[1]}", stream_file, pass_fds=(pipe[1],))
    wait_until(lambda: queued(pipe[0]) == len(stream), "the stream in the pipe")
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 1
    assert one_error_line(err) == "vmtransport: error: interrupted by SIGTERM"


# --- fd: on a socket -------------------------------------------------------------------------


def connected(kind: str) -> tuple[socket.socket, socket.socket]:
    """(ours, the helper's): a Unix socketpair or a TCP connection over loopback."""
    if kind == "unix":
        return socket.socketpair()
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    return ours, theirs


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_fd_socket_read_to_the_end_succeeds(stream_file: Path, stream: bytes, kind: str) -> None:
    ours, theirs = connected(kind)
    with ours, theirs:
        proc = save(f"fd:{theirs.fileno()}", stream_file, pass_fds=(theirs.fileno(),))
        # We still hold the helper's socket: only its shutdown ends the stream for us.
        got = b""
        ours.settimeout(TIMEOUT)
        while chunk := ours.recv(1 << 20):
            got += chunk
        code, err = finish(proc)
    assert code == 0, err
    assert got == stream


@pytest.mark.fault(
    "fd: socket peer closes early",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="n/a",
    exit="1",
    message="'the peer closed the connection before ...'",
)
def test_fd_socket_peer_that_closes_early_fails(stream_file: Path, stream: bytes) -> None:
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    with ours, theirs:
        proc = save(f"fd:{fd}", stream_file, pass_fds=(fd,))
        wait_until(lambda: queued(ours.fileno()) == len(stream), "the stream in the socket")
        assert len(ours.recv(100)) == 100
        ours.close()
        code, err = finish(proc)
    assert code == 1
    assert one_error_line(err) == (
        f"vmtransport: error: fd:{fd}: the peer closed the connection before "
        "it took the whole stream"
    )


def test_fd_socket_waits_for_the_peer(stream_file: Path, stream: bytes) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = save(f"fd:{theirs.fileno()}", stream_file, pass_fds=(theirs.fileno(),))
        wait_until(lambda: queued(ours.fileno()) == len(stream), "the stream in the socket")
        time.sleep(0.5)
        assert proc.poll() is None
        assert queued(theirs.fileno(), SIOCOUTQ) > 0
        got = b""
        while chunk := ours.recv(1 << 20):
            got += chunk
        code, err = finish(proc)
    assert code == 0, err
    assert got == stream
