"""The pump: bounded memory, back-pressure, bytes unchanged, taps, cleanup.

In-process tests drive :func:`vmtransport.pump` / :func:`vmtransport._pipeline.pump_fd` from
real pipes fed by producer threads; the memory test runs the real helper on 2 GiB.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import os
import random
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio
import xxhash

import vmtransport
from vmtransport import Sink, TransportError
from vmtransport._buffers import (
    BUFFER_SIZE,
    BUFFERS,
    PAGE,
    PIPE_SIZE,
    BlockingReader,
    fd_reader,
    grow_pipe,
)
from vmtransport._io import FdSink, FdSource
from vmtransport._pipeline import Tap, pump_blocking
from vmtransport.testing import SyntheticStream

VMT = Path(sys.executable).parent / "vmtransport"
MIB = 1 << 20
KIB = 1 << 10
TIMEOUT = 60


def pump_fd(
    fd: int,
    sink: Sink,
    *,
    taps: Sequence[Tap] = (),
    buffer_size: int = BUFFER_SIZE,
    buffers: int = BUFFERS,
) -> vmtransport.PumpStats:
    """The save helper's driver (threads only) on a descriptor."""
    return pump_blocking(
        fd_reader(fd), sink, label="test pipe", taps=taps, buffer_size=buffer_size, buffers=buffers
    )


class RecordingSink(Sink):
    """Hashes what it is given; ``gate`` (when cleared) holds every write."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.committed = False
        self.aborted = False

    def write(self, data: memoryview) -> None:
        self.entered.set()
        if not self.gate.wait(TIMEOUT):
            raise TransportError("test sink: gate never opened")
        self.hash.update(data)
        self.sizes.append(len(data))

    def commit(self) -> None:
        self.committed = True

    def abort(self) -> None:
        self.aborted = True


class Producer:
    """Writes ``data`` into a pipe from a thread, in random chunks, non-blocking."""

    def __init__(
        self, fd: int, data: bytes, *, seed: int = 0, min_chunk: int = 1, max_chunk: int = 300 * KIB
    ):
        self.fd = fd
        self.data = data
        self.written = 0
        self.rng = random.Random(seed)
        self.min_chunk, self.max_chunk = min_chunk, max_chunk
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.full_for = 0  #: writes in a row that found the pipe full
        os.set_blocking(fd, False)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            view = memoryview(self.data)
            while self.written < len(self.data) and not self.stop.is_set():
                n = self.rng.randint(self.min_chunk, self.max_chunk)
                try:
                    self.written += os.write(self.fd, view[self.written : self.written + n])
                    self.full_for = 0
                except BlockingIOError:
                    self.full_for += 1
                    time.sleep(0.001)
                if self.rng.random() < 0.02:
                    time.sleep(0.001)  # now and then the reader finds the pipe empty
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            os.close(self.fd)

    def __enter__(self) -> Producer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


def pending(fd: int) -> int:
    """Bytes sitting in a pipe (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


class Pipe:
    """A pipe whose ends are closed at teardown unless handed over with take_*()."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def take_r(self) -> int:
        fd, self.r = self.r, -1
        return fd

    def take_w(self) -> int:
        fd, self.w = self.w, -1
        return fd

    def close(self) -> None:
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1


def consumed(producer: Producer, r: int) -> int:
    """What the reader has taken out of the pipe so far."""
    return producer.written - pending(r)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    p.close()


# --- growing pipes -------------------------------------------------------------------------


def test_fd_source_grows_the_pipe(pipe: Pipe) -> None:
    r = pipe.r
    assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) < PIPE_SIZE
    FdSource(r, "test", close=False)
    assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == PIPE_SIZE == 1 << 20
    assert fcntl.fcntl(pipe.w, fcntl.F_GETPIPE_SZ) == PIPE_SIZE  # one pipe, both ends


def test_fd_sink_grows_the_pipe(pipe: Pipe) -> None:
    w = pipe.w
    FdSink(w, "test", close=False)
    assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == PIPE_SIZE


def test_grow_pipe_leaves_other_files_alone(tmp_path: Path, pipe: Pipe) -> None:
    with open(tmp_path / "f", "wb") as f:
        assert grow_pipe(f.fileno()) == 0
    r = pipe.r
    fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    big = fcntl.fcntl(r, fcntl.F_GETPIPE_SZ)
    assert grow_pipe(r, 64 * KIB) == big  # never shrinks


# --- bytes unchanged ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_pump_random_chunks_arrive_unchanged(pipe: Pipe, seed: int) -> None:
    data = random.Random(seed).randbytes(5 * MIB + 17)
    sink = RecordingSink()
    source = FdSource(pipe.take_r(), "test pipe")
    with Producer(pipe.take_w(), data, seed=seed) as producer, trio.fail_after(TIMEOUT):
        stats = await vmtransport.pump(source, sink, buffer_size=64 * KIB, buffers=3)
    assert producer.error is None
    assert stats.bytes == len(data)
    assert sink.hash.hexdigest() == hashlib.sha256(data).hexdigest()
    assert sink.committed and not sink.aborted
    # Every write is a whole buffer but the last: what O_DIRECT sinks rely on.
    assert sink.sizes[:-1] == [64 * KIB] * (len(sink.sizes) - 1)
    assert sink.sizes[-1] == len(data) % (64 * KIB)


@pytest.mark.parametrize("nonblocking", [False, True], ids=["blocking", "nonblocking"])
def test_pump_fd_random_chunks_arrive_unchanged(pipe: Pipe, nonblocking: bool) -> None:
    """The save path: threads only, from a descriptor that may even be non-blocking."""
    r = pipe.r
    os.set_blocking(r, not nonblocking)
    data = random.Random(7).randbytes(3 * MIB + 5)
    sink = RecordingSink()
    with Producer(pipe.take_w(), data, seed=7) as producer:
        stats = pump_fd(r, sink, buffer_size=128 * KIB, buffers=2)
    assert producer.error is None
    assert stats.bytes == len(data)
    assert sink.hash.hexdigest() == hashlib.sha256(data).hexdigest()
    assert sink.sizes[:-1] == [128 * KIB] * (len(sink.sizes) - 1)
    assert sink.committed and not sink.aborted


def test_reader_checksum_covers_every_byte_in_order(pipe: Pipe) -> None:
    """checksum=True: the reader thread hashes what it reads, as it reads it."""
    r = pipe.r
    data = random.Random(11).randbytes(3 * MIB + 7)
    reader = BlockingReader(
        fd_reader(r), label="test pipe", buffer_size=128 * KIB, buffers=3, checksum=True
    )
    sink = RecordingSink()
    with Producer(pipe.take_w(), data, seed=11):
        pump_blocking(reader, sink)
    assert sink.hash.hexdigest() == hashlib.sha256(data).hexdigest()
    assert reader.checksum is not None
    assert reader.checksum.length == len(data)
    assert reader.checksum.digest() == xxhash.xxh3_128(data).digest()


def test_reader_stops_hashing_when_nobody_needs_it(pipe: Pipe) -> None:
    r = pipe.r
    data = random.Random(12).randbytes(2 * MIB)
    reader = BlockingReader(
        fd_reader(r), label="test pipe", buffer_size=128 * KIB, buffers=3, checksum=True
    )
    checksum, reader.checksum = reader.checksum, None
    with Producer(pipe.take_w(), data, seed=12):
        pump_blocking(reader, RecordingSink())
    assert checksum is not None
    assert checksum.length <= 128 * KIB  # at most the buffer it was filling


def test_free_buffers_go_out_last_in_first_out() -> None:
    """The buffer written out last is the next one filled: still warm in the caches."""
    reader = BlockingReader(lambda _: 0, buffer_size=PAGE, buffers=2)
    assert reader.full.get(timeout=TIMEOUT) is None  # an empty stream: both are free
    a, b = reader.pool
    for order in ((a, b), (b, a)):
        for buf in order:
            reader.free.put(buf)
        assert [reader.free.get(), reader.free.get()] == [order[1], order[0]]
    reader.close()


def test_pump_fd_empty_stream(pipe: Pipe) -> None:
    r = pipe.r
    os.close(pipe.take_w())
    sink = RecordingSink()
    assert pump_fd(r, sink).bytes == 0
    assert sink.sizes == []
    assert sink.committed


def test_taps_see_every_byte_in_order(pipe: Pipe) -> None:
    r = pipe.r
    data = random.Random(9).randbytes(MIB + 1)
    tapped = hashlib.sha256()
    sink = RecordingSink()
    with Producer(pipe.take_w(), data):
        pump_fd(r, sink, taps=(tapped.update,), buffer_size=64 * KIB)
    assert tapped.hexdigest() == sink.hash.hexdigest() == hashlib.sha256(data).hexdigest()


def test_bad_geometry(pipe: Pipe) -> None:
    r = pipe.r
    with pytest.raises(ValueError, match="bad pump geometry"):
        pump_fd(r, RecordingSink(), buffer_size=1000)
    with pytest.raises(ValueError, match="bad pump geometry"):
        pump_fd(r, RecordingSink(), buffers=1)


# --- back-pressure ---------------------------------------------------------------------------


async def test_back_pressure_stops_reading_when_the_pool_is_full(
    pipe: Pipe,
) -> None:
    r = pipe.r
    bs, nbuf = 64 * KIB, 4
    data = os.urandom(8 * MIB)
    sink = RecordingSink()
    sink.gate.clear()  # the sink hangs in its first write
    source = FdSource(pipe.take_r(), "test pipe")
    pipe_size = fcntl.fcntl(r, fcntl.F_GETPIPE_SZ)
    stats: list[vmtransport.PumpStats] = []

    async def run_pump() -> None:
        stats.append(await vmtransport.pump(source, sink, buffer_size=bs, buffers=nbuf))

    try:
        # Whole pages, so that a full pipe takes no more bytes at all.
        producer = Producer(pipe.take_w(), data, min_chunk=PAGE, max_chunk=PAGE)
        with producer, trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_pump)
                try:
                    # Wait until the pipe is full and the pool is taken...
                    while producer.full_for < 10 or consumed(producer, r) < nbuf * bs:
                        await trio.sleep(0.01)
                    in_pipe = pending(r)
                    await trio.sleep(0.3)
                    # ... and stays so: the reader took exactly the pool (one buffer in
                    # the sink, the rest queued) and stopped; the producer is blocked.
                    assert consumed(producer, r) == nbuf * bs
                    assert pending(r) == in_pipe == pipe_size
                    assert producer.full_for >= 10
                    assert producer.written < len(data)
                    assert sink.entered.is_set()
                    assert sink.sizes == []  # still inside the first write
                finally:
                    sink.gate.set()  # else a failed assertion waits for the sink forever
        assert producer.error is None
    finally:
        sink.gate.set()
    assert stats[0].bytes == len(data)
    assert sink.hash.hexdigest() == hashlib.sha256(data).hexdigest()
    assert sink.committed


def test_pump_fd_back_pressure(pipe: Pipe) -> None:
    """The same with the threads-only driver: at most ``buffers`` buffers are read ahead."""
    r = pipe.r
    bs, nbuf = 64 * KIB, 3
    grow_pipe(r)
    data = os.urandom(6 * MIB)
    sink = RecordingSink()
    sink.gate.clear()
    result: list[vmtransport.PumpStats] = []
    runner = threading.Thread(
        target=lambda: result.append(pump_fd(r, sink, buffer_size=bs, buffers=nbuf)),
        daemon=True,
    )
    try:
        with Producer(pipe.take_w(), data, min_chunk=PAGE, max_chunk=PAGE) as producer:
            runner.start()
            deadline = time.monotonic() + TIMEOUT
            while producer.full_for < 10 or consumed(producer, r) < nbuf * bs:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.3)
            # One buffer in the sink, the others full and queued, and the reader waiting
            # for a free one: nothing more is read.
            assert consumed(producer, r) == nbuf * bs
            assert producer.full_for >= 10
            assert sink.sizes == []
            sink.gate.set()
            runner.join(TIMEOUT)
    finally:
        sink.gate.set()
    assert result and result[0].bytes == len(data)
    assert sink.hash.hexdigest() == hashlib.sha256(data).hexdigest()


# --- failures: both ends cleaned up --------------------------------------------------------------


def _file_sink(path: Path) -> Sink:
    return vmtransport.open_sink(f"file:{path}")


@pytest.mark.fault(
    "a tap (validator) fails mid-save",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="nothing in the directory",
    exit="the tap's exception raised",
    message="the tap's own",
)
def test_failing_tap_aborts_the_sink(tmp_path: Path, pipe: Pipe) -> None:
    r = pipe.r
    image = tmp_path / "vm.sav"
    calls: list[int] = []

    def tap(view: memoryview) -> None:
        calls.append(len(view))
        if len(calls) == 2:
            raise ValueError("tap says no")

    sink = _file_sink(image)
    with Producer(pipe.take_w(), os.urandom(MIB)), pytest.raises(ValueError, match="tap says no"):
        pump_fd(r, sink, taps=(tap,), buffer_size=64 * KIB)
    assert len(calls) == 2  # nothing was tapped (or written) after the failure
    assert list(tmp_path.iterdir()) == []


@pytest.mark.fault(
    "a tap (validator) fails mid-save, async pump",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="nothing in the directory; the source's flags put back",
    exit="the tap's exception raised",
    message="the tap's own",
)
async def test_failing_tap_aborts_both_ends_async(tmp_path: Path, pipe: Pipe) -> None:
    r = pipe.r
    image = tmp_path / "vm.sav"
    sink = _file_sink(image)
    source = FdSource(r, "test pipe", close=False)
    calls: list[int] = []

    def tap(view: memoryview) -> None:
        calls.append(len(view))
        raise ValueError("tap says no")

    with Producer(pipe.take_w(), os.urandom(MIB)) as producer:
        with trio.fail_after(TIMEOUT), pytest.raises(ValueError, match="tap says no"):
            await vmtransport.pump(source, sink, taps=(tap,), buffer_size=64 * KIB)
        producer.stop.set()
    assert calls == [64 * KIB]
    assert list(tmp_path.iterdir()) == []
    assert os.get_blocking(r)  # the source was aborted: its flags are back


@pytest.mark.fault(
    "async pump cancelled while the producer is quiet",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="nothing in the directory; the source's flags put back",
    exit="Cancelled",
    message="none",
)
async def test_cancelled_pump_aborts_the_sink(tmp_path: Path, pipe: Pipe) -> None:
    r = pipe.r
    image = tmp_path / "vm.sav"
    sink = _file_sink(image)
    source = FdSource(r, "test pipe", close=False)
    os.write(pipe.w, os.urandom(100 * KIB))  # some data, then the producer goes quiet
    with trio.fail_after(TIMEOUT):
        with trio.move_on_after(0.3) as scope:
            await vmtransport.pump(source, sink, buffer_size=64 * KIB)
        assert scope.cancelled_caught
    assert list(tmp_path.iterdir()) == []
    assert os.get_blocking(r)  # the source put the descriptor's flags back


# --- memory stays bounded ---------------------------------------------------------------------


# Runs argv as its child and reports the child's max RSS and exit code. A child's max RSS
# starts from its parent's at fork (Linux carries the forking mm's high-water mark over
# exec), so the helper must be forked from this small process, not from pytest.
_RSS_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status))
"""


def test_save_2gib_in_bounded_memory() -> None:
    """The real helper streams (and validates) a 2 GiB QEMU stream through its fixed
    pool: max RSS well below 100 MiB."""
    rfd, wfd = os.pipe()
    total = 0
    # Made up as it goes (256 random pages over and over): never all in memory.
    stream = SyntheticStream(size=(2 << 30) + 12345, distinct_pages=256)

    def produce() -> None:
        nonlocal total
        try:
            for chunk in stream.chunks():
                os.write(wfd, chunk)  # blocking: all of it
                total += len(chunk)
        except BrokenPipeError:
            pass
        finally:
            os.close(wfd)

    uri = "file:/dev/null,format=raw"
    proc = subprocess.Popen(
        [sys.executable, "-c", _RSS_WRAPPER, str(VMT), "-v", "save", uri],
        stdin=rfd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(rfd)
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        producer.join(TIMEOUT)
    max_rss, code = (int(x) for x in out.split())
    assert code == 0, err
    assert total == len(stream)
    assert f"saved to {uri}: {total} bytes" in err.decode()
    assert max_rss < 100 * MIB, f"max RSS {max_rss / MIB:.0f} MiB"
    # Sanity (the helper was measured, not a wrapper): its buffers in use were in there.
    # Only those: the free ones go out last in first out, so a pool the sink keeps up
    # with leaves most of its BUFFERS untouched.
    assert max_rss > BUFFER_SIZE


# --- several reads in flight (file sources) ------------------------------------------------


def _file_reader(
    path: Path, *, buffer_size: int, buffers: int, depth: int
) -> tuple[BlockingReader, int]:
    fd = os.open(path, os.O_RDONLY)

    def pread(buf: memoryview, pos: int) -> int:
        return os.preadv(fd, [buf], pos)

    size = path.stat().st_size
    reader = BlockingReader(
        lambda _: 0,
        label=str(path),
        at=(pread, 0, size),
        buffer_size=buffer_size,
        buffers=buffers,
        depth=depth,
    )
    return reader, fd


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("size", [0, 1, 64 * KIB, 64 * KIB + 1, 1 * MIB + 12345])
def test_parallel_reads_arrive_in_order(tmp_path: Path, depth: int, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "src"
    path.write_bytes(data)
    reader, fd = _file_reader(path, buffer_size=64 * KIB, buffers=4, depth=depth)
    try:
        sink = RecordingSink()
        stats = pump_blocking(reader, sink)
    finally:
        os.close(fd)
    assert stats.bytes == size
    assert sink.hash.hexdigest() == hashlib.sha256(data).hexdigest()
    assert sink.committed
    assert reader.head == data[: BlockingReader.HEAD]


@pytest.mark.fault(
    "read error mid-file (parallel reads)",
    direction="restore",
    vm="the sink got exactly the bytes before the error, then abort",
    disk="n/a",
    exit="TransportError raised",
    message="'injected failure at N'",
)
def test_parallel_read_error_reaches_the_pump_after_the_good_chunks(tmp_path: Path) -> None:
    data = os.urandom(640 * KIB)
    path = tmp_path / "src"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)

    def pread(buf: memoryview, pos: int) -> int:
        if pos >= 320 * KIB:
            raise TransportError(f"reading {path}: injected failure at {pos}")
        time.sleep(random.random() / 100)  # finish out of order
        return os.preadv(fd, [buf], pos)

    reader = BlockingReader(
        lambda _: 0, label="src", at=(pread, 0, len(data)), buffer_size=64 * KIB, buffers=4, depth=3
    )
    sink = RecordingSink()
    try:
        with pytest.raises(TransportError, match="injected failure at 327680"):
            pump_blocking(reader, sink)
    finally:
        os.close(fd)
    assert sink.aborted and not sink.committed
    assert sink.hash.hexdigest() == hashlib.sha256(data[: 320 * KIB]).hexdigest()


@pytest.mark.fault(
    "the sink fails its first write (parallel reads)",
    direction="restore",
    vm="n/a",
    disk="every reader thread ends",
    exit="TransportError raised",
    message="the sink's own",
)
def test_parallel_reads_stop_when_the_sink_fails(tmp_path: Path) -> None:
    path = tmp_path / "src"
    path.write_bytes(os.urandom(4 * MIB))
    before = len(os.listdir("/proc/self/task"))
    reader, fd = _file_reader(path, buffer_size=64 * KIB, buffers=4, depth=3)

    class Failing(RecordingSink):
        def write(self, data: memoryview) -> None:
            raise TransportError("sink full")

    def threads() -> int:  # _thread's threads are not in threading's count
        return len(os.listdir("/proc/self/task"))

    try:
        with pytest.raises(TransportError, match="sink full"):
            pump_blocking(reader, Failing())
    finally:
        os.close(fd)
    # Every reader thread ends: none is left waiting for its turn or a buffer.
    deadline = time.monotonic() + 5
    while threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads() == before


def test_save_helper_reads_before_its_heavy_imports(tmp_path: Path) -> None:
    """QEMU blocks once the 1 MiB pipe to the save helper is full: right after parsing
    its command line, the helper starts the reader (``vmtransport._buffers``), before
    importing the registry, pluggy and the rest — each costs milliseconds of a blocked
    migration."""
    stream = tmp_path / "head"
    stream.write_bytes(bytes(SyntheticStream(1))[:4096])
    with stream.open("rb") as stdin:
        proc = subprocess.run(
            [str(VMT), "save", f"odirect:{tmp_path / 'img'}"],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
        )
    assert proc.returncode == 1  # an incomplete stream, refused
    order = [
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    ]
    assert "vmtransport._buffers" in order, proc.stderr[-2000:]
    before = set(order[: order.index("vmtransport._buffers")])
    # The command line is parsed first (one parser); the registry, pluggy, the use
    # cases, the image and stream modules load while the reader already reads.
    heavy = {"pluggy", "vmtransport._registry", "vmtransport._usecases", "trio", "xxhash",
             "vmtransport.image", "vmtransport.stream", "logging", "subprocess"}  # fmt: skip
    assert "vmtransport._cli" in before
    assert not before & heavy, before & heavy
    assert not (tmp_path / "img").exists()
