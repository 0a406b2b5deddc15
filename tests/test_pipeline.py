"""The pipelines: the Sink contract kept on every built-in path, observers, and a
cancel that returns within a second whatever the sink is doing."""

from __future__ import annotations

import ctypes
import gzip
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import ClassVar

import pytest
import trio

import vmtransport
from vmtransport import (
    Interrupted,
    Progress,
    Registry,
    SeekableSink,
    Sink,
    StateEvent,
    Transport,
    TransportError,
)
from vmtransport.image._header import HEADER_SIZE
from vmtransport.image._libvirt import build_libvirt_header
from vmtransport.testing import SyntheticStream
from vmtransport.transports import FileTransport

VMT = Path(sys.executable).parent / "vmtransport"
PAGE = 4096
MIB = 1 << 20


def aligned(view: memoryview) -> bool:
    """Page aligned; read-only views (copies) count as unaligned: only the pipeline's
    own buffers, which are writable, are promised aligned."""
    if view.readonly:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % PAGE == 0


class ContractSink(SeekableSink):
    """Wraps a sink and checks that whoever drives it keeps the Sink contract
    (vmtransport/_transport.py); every breach is recorded in :attr:`breaches`.

    ``strict``: the path promises the pipeline's own buffers (page aligned, whole 4 KiB
    blocks, only the last write shorter)."""

    def __init__(self, inner: Sink, *, strict: bool) -> None:
        self.inner = inner
        self.strict = strict
        self.breaches: list[str] = []
        self.writes: list[tuple[bool, int]] = []  # (aligned, length)
        self.ended: str | None = None
        self.failed_commit = False
        self.thread: int | None = None
        self.busy = threading.Lock()
        self.write_behind_asked = False
        self.rewritable = isinstance(inner, SeekableSink) and inner.rewritable

    def _enter(self, what: str) -> None:
        me = threading.get_ident()
        if self.thread is None:
            self.thread = me
        elif self.thread != me:
            self.breaches.append(f"{what} from a second thread")
        if not self.busy.acquire(blocking=False):
            self.breaches.append(f"{what} while another call runs")
        else:
            self.busy.release()

    def enable_write_behind(self) -> int:
        self._enter("enable_write_behind")
        if self.writes or self.write_behind_asked:
            self.breaches.append("enable_write_behind after a write, or twice")
        self.write_behind_asked = True
        return self.inner.enable_write_behind()

    def write(self, data: memoryview) -> None:
        self._enter("write")
        if not isinstance(data, memoryview) or len(data) == 0:
            self.breaches.append(f"write of {type(data).__name__} of {len(data)} bytes")
        if self.ended is not None:
            self.breaches.append(f"write after {self.ended}")
        with self.busy:
            self.writes.append((aligned(data), len(data)))
            self.inner.write(data)

    def rewrite(self, offset: int, data: memoryview) -> None:
        self._enter("rewrite")
        if offset % PAGE or len(data) % PAGE or not aligned(data):
            self.breaches.append(f"rewrite at {offset} of {len(data)} bytes, unaligned")
        assert isinstance(self.inner, SeekableSink)
        with self.busy:
            self.inner.rewrite(offset, data)

    def commit(self) -> None:
        self._enter("commit")
        if self.ended is not None:
            self.breaches.append(f"commit after {self.ended}")
        self.ended = "commit"
        try:
            self.inner.commit()
        except BaseException:
            self.failed_commit = True
            raise

    def abort(self) -> None:
        self._enter("abort")
        if self.ended is not None and not (self.ended == "commit" and self.failed_commit):
            self.breaches.append(f"abort after {self.ended}")
        self.ended = "abort"
        self.inner.abort()

    def check(self, *, committed: bool) -> None:
        if self.strict:
            body = self.writes[:-1]
            bad = [w for w in body if not (w[0] and w[1] % PAGE == 0)]
            if bad:
                self.breaches.append(f"{len(bad)} unaligned writes before the last: {bad[:3]}")
        assert self.breaches == []
        assert self.ended == ("commit" if committed else "abort")
        if committed:
            assert not self.failed_commit


class ContractTransport(Transport):
    """``contract:PATH[,format=raw]``: a file: target behind a ContractSink; the sinks it
    opened are in ``opened`` (class-wide, for the test to inspect)."""

    scheme = "contract"
    options: ClassVar[Mapping[str, str]] = {"format": "image or raw"}
    opened: list[ContractSink] = []  # noqa: RUF012 (the tests' record)
    strict = True

    def __init__(self, uri: vmtransport.URI) -> None:
        super().__init__(uri)
        self.save_format = self.choice_option("format", ("image", "raw"))

    def open_sink(self) -> Sink:
        inner = FileTransport(FileTransport.parse("file:" + self.uri.target)).open_sink()
        sink = ContractSink(inner, strict=type(self).strict)
        self.opened.append(sink)
        return sink

    async def open_source(self) -> vmtransport.Source:
        raise NotImplementedError


class _Plugin:
    __name__ = "contract-test"

    @staticmethod
    @vmtransport.hookimpl
    def vmtransport_transports() -> Sequence[type[Transport]]:
        return [ContractTransport]


@pytest.fixture
def registry() -> Iterator[Registry]:
    ContractTransport.opened.clear()
    ContractTransport.strict = True
    yield Registry(entry_points=False, extra=(_Plugin(),))


@pytest.fixture
def stream(tmp_path: Path) -> tuple[Path, bytes]:
    # About 3 MiB: several pool buffers with a small geometry, an odd-sized tail.
    data = SyntheticStream(size=3 * MIB + 12345, seed=7).to_bytes()
    path = tmp_path / "stream.bin"
    path.write_bytes(data)
    return path, data


def feed(data: bytes) -> int:
    """A pipe's read end with ``data`` flowing in from a thread."""
    r, w = os.pipe()

    def run() -> None:
        try:
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BrokenPipeError:
            pass

    threading.Thread(target=run, daemon=True).start()
    return r


@pytest.mark.parametrize("fmt", ["image", "raw"])
def test_save_keeps_the_sink_contract(
    tmp_path: Path, registry: Registry, stream: tuple[Path, bytes], fmt: str
) -> None:
    _, data = stream
    target = tmp_path / "out"
    uri = f"contract:{target}" + (",format=raw" if fmt == "raw" else "")
    r = feed(data)
    try:
        stats = vmtransport.save_pipeline(uri, r, registry=registry).run()
    finally:
        os.close(r)
    assert stats.bytes == len(data)
    (sink,) = ContractTransport.opened
    sink.check(committed=True)
    assert sum(n for _, n in sink.writes) == len(data) + (HEADER_SIZE if fmt == "image" else 0)
    body = target.read_bytes()
    assert body[-len(data) :] == data


def libvirt_image(path: Path, data: bytes, compression: str) -> Path:
    payload = gzip.compress(data, 1) if compression == "gzip" else data
    header = build_libvirt_header("<domain/>", was_running=False, format=compression)
    path.write_bytes(header + payload)
    return path


@pytest.mark.parametrize("kind", ["raw", "image", "libvirt-raw", "libvirt-gzip"])
def test_restore_and_copy_keep_the_sink_contract(
    tmp_path: Path, registry: Registry, stream: tuple[Path, bytes], kind: str
) -> None:
    raw, data = stream
    if kind == "raw":
        src = raw
    elif kind == "image":
        src = tmp_path / "img"
        with raw.open("rb") as f:
            vmtransport.save_fd(f"file:{src}", f.fileno())
    else:
        src = libvirt_image(tmp_path / "lv", data, kind.partition("-")[2])
    # restore: into a contract sink in front of a file (what reaches QEMU's pipe)
    out = tmp_path / "restored"
    inner = FileTransport(FileTransport.parse(f"file:{out},format=raw")).open_sink()
    # Every restore holds back the stream's end (device state, EOF, description) until
    # the stream is proven, so even a raw stream's views start and end anywhere.
    sink = ContractSink(inner, strict=False)
    vmtransport.restore_pipeline(f"file:{src}", sink, registry=registry).run()
    sink.check(committed=True)
    assert out.read_bytes() == data
    # copy: into a contract: image (a libvirt image's stream starts at an odd offset)
    ContractTransport.strict = False
    dst = tmp_path / "copied"
    vmtransport.copy_pipeline(f"file:{src}", f"contract:{dst}", registry=registry).run()
    (copied,) = ContractTransport.opened
    copied.check(committed=True)
    assert dst.read_bytes()[HEADER_SIZE:] == data


def test_progress_and_events(tmp_path: Path, stream: tuple[Path, bytes]) -> None:
    raw, data = stream
    pipeline = vmtransport.copy_pipeline(f"file:{raw}", f"file:{tmp_path / 'img'}")
    progress: list[Progress] = []
    events: list[StateEvent] = []
    pipeline.on_progress(progress.append)
    pipeline.on_event(events.append)
    pipeline.run()
    assert [e.state for e in events] == ["started", "eof", "committing", "complete"]
    assert events[-1].bytes == len(data)
    assert progress and progress[-1].bytes == len(data)
    assert all(a.bytes < b.bytes for a, b in pairwise(progress))
    assert all(p.rate > 0 for p in progress)


class StallingSink(Sink):
    """Wraps a sink; the ``stall_at``-th write blocks until ``release`` is set, as a write
    on a stalled disk does. Records what happened in which order."""

    def __init__(self, inner: Sink, stall_at: int = 2) -> None:
        self.inner = inner
        self.stall_at = stall_at
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.log: list[str] = []
        self.count = 0

    def write(self, data: memoryview) -> None:
        self.count += 1
        if self.count == self.stall_at:
            self.stalled.set()
            self.release.wait(60)
            self.log.append("stalled write returned")
        self.inner.write(data)

    def commit(self) -> None:
        self.log.append("commit")
        self.inner.commit()

    def abort(self) -> None:
        self.log.append("abort")
        self.inner.abort()

    def cancel(self) -> None:
        self.log.append("cancel")
        self.inner.cancel()


class StallTransport(Transport):
    """``stall:PATH``: an image on a file whose second write stalls."""

    scheme = "stall"
    save_format = "image"
    sinks: list[StallingSink] = []  # noqa: RUF012

    def open_sink(self) -> Sink:
        inner = FileTransport(FileTransport.parse("file:" + self.uri.target)).open_sink()
        sink = StallingSink(inner)
        self.sinks.append(sink)
        return _Seekable(sink, inner)

    async def open_source(self) -> vmtransport.Source:
        raise NotImplementedError


class _Seekable(SeekableSink):
    """A StallingSink that can still rewrite (so the save writes an image)."""

    def __init__(self, stalling: StallingSink, inner: Sink) -> None:
        self.s = stalling
        assert isinstance(inner, SeekableSink)
        self.inner = inner

    def write(self, data: memoryview) -> None:
        self.s.write(data)

    def rewrite(self, offset: int, data: memoryview) -> None:
        self.inner.rewrite(offset, data)

    def commit(self) -> None:
        self.s.commit()

    def abort(self) -> None:
        self.s.abort()

    def cancel(self) -> None:
        self.s.cancel()


class _StallPlugin:
    __name__ = "stall-test"

    @staticmethod
    @vmtransport.hookimpl
    def vmtransport_transports() -> Sequence[type[Transport]]:
        return [StallTransport]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.fault(
    "disk stalls mid-save, then cancel()",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="nothing under any name, during the stuck write and after",
    exit="Interrupted raised; cancel returns in < 1 s",
    message="none (in-process)",
)
def test_cancel_of_a_save_stuck_on_a_stalled_disk(tmp_path: Path) -> None:
    """The acceptance test of issue 10: a save whose sink blocks is cancelled within 1 s;
    no image is left, and the sink is aborted only after its stuck write returned."""
    StallTransport.sinks.clear()
    reg = Registry(entry_points=False, extra=(_StallPlugin(),))
    data = SyntheticStream(size=40 * MIB, seed=3).to_bytes()
    out_dir = tmp_path / "vm"
    out_dir.mkdir()
    r = feed(data)
    pipeline = vmtransport.save_pipeline(f"stall:{out_dir / 'a.sav'}", r, registry=reg)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pipeline.run()
        except BaseException as exc:
            errors.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    (sink,) = StallTransport.sinks
    assert sink.stalled.wait(30)
    t0 = time.monotonic()
    pipeline.cancel()
    took = time.monotonic() - t0
    assert took < 1.0, took
    assert not pipeline.finished  # the write is still stuck...
    assert leftovers(out_dir) == []  # ...and nothing is there under any name
    sink.release.set()  # the disk comes back
    runner.join(10)
    assert not runner.is_alive()
    assert sink.log == ["cancel", "stalled write returned", "abort"]
    assert leftovers(out_dir) == []
    assert len(errors) == 1 and isinstance(errors[0], Interrupted)
    os.close(r)


@pytest.mark.fault(
    "disk stalls mid-copy, then a trio cancel scope",
    direction="copy",
    vm="n/a",
    disk="nothing under any name; the sink aborted, never committed",
    exit="cancelled in < 1 s",
    message="none (in-process)",
)
def test_cancel_from_trio_returns_while_the_write_is_stuck(tmp_path: Path) -> None:
    """A trio caller's cancel scope ends a copy stuck on a stalled sink within 1 s."""
    StallTransport.sinks.clear()
    reg = Registry(entry_points=False, extra=(_StallPlugin(),))
    src = SyntheticStream(size=24 * MIB, seed=5).write_to(tmp_path / "s.bin")
    out_dir = tmp_path / "vm"
    out_dir.mkdir()
    pipeline = vmtransport.copy_pipeline(f"file:{src}", f"stall:{out_dir / 'b.sav'}", registry=reg)
    (sink,) = StallTransport.sinks
    took: list[float] = []

    async def main() -> None:
        with trio.move_on_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipeline.run_async)
                await trio.to_thread.run_sync(sink.stalled.wait, 30)
                t0 = time.monotonic()
                nursery.cancel_scope.cancel()
            took.append(time.monotonic() - t0)

    trio.run(main)
    assert took and took[0] < 1.0, took
    assert leftovers(out_dir) == []
    sink.release.set()
    deadline = time.monotonic() + 10
    while not pipeline.finished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.log[-1] == "abort" and "commit" not in sink.log
    assert leftovers(out_dir) == []


@pytest.mark.fault(
    "helper SIGTERM mid-copy into a pipe nobody reads",
    direction="copy",
    vm="n/a",
    disk="n/a",
    exit="1 within 1 s",
    message="'interrupted by SIGTERM'",
)
def test_copy_into_a_pipe_nobody_reads_stops_on_sigterm(tmp_path: Path) -> None:
    """``vmtransport copy SRC fd:N`` blocked on a full pipe exits within 1 s of SIGTERM."""
    src = SyntheticStream(size=32 * MIB, seed=9).write_to(tmp_path / "s.bin")
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            [str(VMT), "copy", f"file:{src}", f"fd:{w}"],
            pass_fds=(w,),
            stderr=subprocess.PIPE,
        )
        os.close(w)
        # Wait until the pipe is full: the writer is stuck in write(2).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _queued(r) >= (1 << 16) and _idle(proc.pid):
                break
            time.sleep(0.05)
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        took = time.monotonic() - t0
        assert proc.stderr is not None
        with proc.stderr:
            err = proc.stderr.read().decode()
        assert took < 1.0, (took, err)
        assert proc.returncode == 1, err
        assert err.strip().splitlines() == ["vmtransport: error: interrupted by SIGTERM"]
    finally:
        os.close(r)


def _queued(fd: int) -> int:
    import array
    import fcntl
    import termios

    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


def _idle(pid: int) -> bool:
    """Whether the process is asleep (blocked), not running."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] == "S"


def test_cancel_before_run_aborts_nothing_and_refuses_to_start(tmp_path: Path) -> None:
    r = feed(SyntheticStream(pages=10).to_bytes())
    pipeline = vmtransport.save_pipeline(f"file:{tmp_path / 'x'}", r)
    pipeline.cancel()
    with pytest.raises(Interrupted):
        pipeline.run()
    assert leftovers(tmp_path) == []
    os.close(r)


@pytest.mark.fault(
    "a third-party sink fails its write",
    direction="restore",
    vm="n/a",
    disk="the sink aborted",
    exit="TransportError raised",
    message="the sink's own message",
)
def test_failing_sink_error_reaches_the_caller(tmp_path: Path) -> None:
    class Failing(Sink):
        aborted = False

        def write(self, data: memoryview) -> None:
            raise TransportError("test sink: disk on fire")

        def commit(self) -> None:
            raise AssertionError("never")

        def abort(self) -> None:
            Failing.aborted = True

    raw = SyntheticStream(pages=100).write_to(tmp_path / "s")
    pipeline = vmtransport.restore_pipeline(f"file:{raw}", Failing())
    events: list[str] = []
    pipeline.on_event(lambda e: events.append(e.state))
    with pytest.raises(TransportError, match="disk on fire"):
        pipeline.run()
    assert Failing.aborted
    assert events == ["started", "failed"]
