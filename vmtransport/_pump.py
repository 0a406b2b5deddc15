"""Move a stream into a sink: reading overlaps writing.

A fixed pool of page-aligned buffers circulates between a reader and a writer: the
reader fills a free buffer completely (so O_DIRECT writes are whole aligned blocks; only
the last is short), the writer drains full ones; one of the two runs in a thread. When the
sink is slow the pool runs dry and the reader stops reading: back-pressure reaches the producer
through the pipe, and memory stays at ``buffers * buffer_size`` whatever the stream.

Two drivers share that shape:

* :func:`pump_blocking` — threads only, from a blocking read function
  (:class:`~._early.BlockingReader`): a save helper's stdin (QEMU's migration thread
  writes it in blocking mode) or a restore helper's file (:class:`ThreadedSource`).
  It needs no event loop, so a helper starts in a few tens of milliseconds instead
  of paying for importing trio while QEMU waits.
* :func:`pump` — from an async :class:`Source` on the trio event loop (restore, copy).

Taps see every chunk, in order, before it is written (a stream parser, a checksum); a
tap that raises stops the pump and aborts both ends.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, TypeVar

from ._early import (
    BUFFER_SIZE,
    BUFFERS,
    BlockingReader,
    Worker,
    aligned_buffer,
    check_geometry,
    close_pool,
)
from ._errors import VMTransportError
from ._io import FdSink
from ._transport import Sink, Source, ThreadedSource, Transport

Tap = Callable[[memoryview], None]
T = TypeVar("T")


class PumpStats(NamedTuple):
    bytes: int
    seconds: float

    @property
    def mib_per_s(self) -> float:
        return self.bytes / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


def _write_chunk(sink: Sink, taps: Sequence[Tap], buf: mmap.mmap, n: int) -> None:
    # Views are not released explicitly: a failing write's traceback may still hold
    # slices of them, and release() would then raise BufferError over the real error.
    view = memoryview(buf)[:n]
    for tap in taps:
        tap(view)
    sink.write(view)


class _Recycler:
    """Returns written buffers to the reader, holding back the ``depth`` latest: a sink
    with write-behind may still be reading them (see Sink.enable_write_behind)."""

    def __init__(self, reader: BlockingReader, depth: int) -> None:
        self._free = reader.free
        self._depth = depth
        self._held: list[mmap.mmap] = []

    def written(self, buf: mmap.mmap) -> None:
        if not self._depth:
            self._free.put(buf)
            return
        self._held.append(buf)
        if len(self._held) > self._depth:
            self._free.put(self._held.pop(0))


class EarlyWriter:
    """Writes a reader's buffers into a sink from a thread of its own, from before the
    CLI is ready until :meth:`handoff` — so that a helper's start-up (argument parsing,
    loading the plugin registry) does not hold the stream up once the pool is full.

    The sink comes from a built-in transport opened ahead of the registry: whoever hands
    off first checks that the registry resolves the URI to that same transport.
    """

    def __init__(self, reader: BlockingReader, sink: Sink) -> None:
        self.reader = reader
        self.sink = sink
        self.started = time.monotonic()
        self.total = 0
        self.eof = False
        self.error: BaseException | None = None
        self._stopping = False
        self.recycler = _Recycler(reader, sink.enable_write_behind())
        self._thread = Worker(self._write)

    def _write(self) -> None:
        full, recycler = self.reader.full, self.recycler
        try:
            while not self._stopping:
                item = full.get()
                if item is None:
                    self.eof = True
                    return
                buf, n = item
                if n < 0:  # handoff() or stop()
                    return
                _write_chunk(self.sink, (), buf, n)
                self.total += n
                recycler.written(buf)
        except BaseException as exc:
            self.error = exc

    def wait(self) -> None:
        """Wait until the thread has written the whole stream, or failed."""
        self._thread.join()

    def _wake(self) -> None:
        # A marker behind the buffers already queued: they are written first, in order.
        self.reader.full.put((self.reader.pool[0], -1))

    def handoff(self) -> tuple[int, bool]:
        """Let the caller's thread take over; return the bytes written so far and whether
        the stream has ended. Raises what the writer ran into."""
        self._wake()
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.total, self.eof

    def stop(self, timeout: float = 1.0) -> None:
        """Stop writing (a write in flight is waited for, up to ``timeout`` seconds)."""
        self._stopping = True
        self._wake()
        self._thread.join(timeout)


class EarlySource(NamedTuple):
    """A threaded source opened, a reader started on it and the stream going out to
    stdout already, before the registry: see ``_main``."""

    transport: type[Transport]
    source: ThreadedSource
    out: FdSink  #: stdout
    writer: EarlyWriter  #: its sink: the VerifyingReader in front of ``out``

    def discard(self) -> None:
        _discard(self.writer)
        self.source.close()


class EarlySave(NamedTuple):
    """A save's target opened (unnamed, until commit) and written from a thread before
    the registry: see ``_main``."""

    transport: type[Transport]
    uri: str
    writer: EarlyWriter  #: its sink: the StreamWriter/ImageWriter on the target

    def discard(self) -> None:
        _discard(self.writer)


def _discard(writer: EarlyWriter) -> None:
    """Abandon an early start: nothing it wrote is kept. Safe to repeat, and after the
    pump took it over (an aborted or committed sink stays so)."""
    writer.reader.stop()
    writer.stop()
    writer.sink.abort()
    writer.reader.close()


def pump_blocking(
    read: Callable[[memoryview], int | None] | BlockingReader,
    sink: Sink,
    *,
    label: str = "the source",
    taps: Sequence[Tap] = (),
    buffer_size: int = BUFFER_SIZE,
    buffers: int = BUFFERS,
    early: EarlyWriter | None = None,
) -> PumpStats:
    """Copy from a blocking ``read`` (or a started :class:`BlockingReader`) to ``sink``
    until EOF; commit it, or abort it on any error.

    A reader thread fills buffers; the calling thread writes them, so a signal handler's
    exception (SIGTERM) arrives here, even in a write blocked on a stalled consumer, and
    aborts the sink. ``early``: the thread that has been writing ``read`` into ``sink``
    so far; this thread takes over from it.
    """
    reader = (
        read
        if isinstance(read, BlockingReader)
        else BlockingReader(read, label=label, buffer_size=buffer_size, buffers=buffers)
    )
    if early is not None and (early.reader is not reader or early.sink is not sink or taps):
        raise ValueError("pump_blocking: early writer of another reader or sink")
    start = early.started if early is not None else time.monotonic()
    total = 0
    try:
        ended = False
        if early is not None:
            recycler = early.recycler
            total, ended = early.handoff()
        else:
            recycler = _Recycler(reader, sink.enable_write_behind())
        while not ended and (item := reader.full.get()) is not None:
            buf, n = item
            _write_chunk(sink, taps, buf, n)
            total += n
            recycler.written(buf)
        if reader.error is not None:
            raise reader.error
        sink.commit()
    except BaseException:
        reader.stop()
        if early is not None:
            early.stop()
        sink.abort()
        raise
    finally:
        reader.close()
    return PumpStats(total, time.monotonic() - start)


def _first_error(exc: BaseException) -> BaseException:
    """Unwrap nursery exception groups to the error a user should see."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        ours = [e for e in exc.exceptions if isinstance(_first_error(e), VMTransportError)]
        exc = _first_error(ours[0] if ours else exc.exceptions[0])
    return exc


async def pump(
    source: Source,
    sink: Sink,
    *,
    taps: Sequence[Tap] = (),
    buffer_size: int = BUFFER_SIZE,
    buffers: int = BUFFERS,
) -> PumpStats:
    """Copy ``source`` to ``sink``; commit both on success, abort both otherwise.

    The source is committed before the sink, so a producer that reports failure at the
    end (an exec: command's exit status) keeps the sink from being committed. On
    cancellation both ends are aborted and ``trio.Cancelled`` propagates.
    """
    import trio

    check_geometry(buffer_size, buffers)
    pool = [aligned_buffer(buffer_size) for _ in range(buffers)]
    free_send, free_recv = trio.open_memory_channel[mmap.mmap](buffers)
    full_send, full_recv = trio.open_memory_channel[tuple[mmap.mmap, int]](buffers)
    for b in pool:
        free_send.send_nowait(b)
    total = 0

    async def reader() -> None:
        async with full_send:
            eof = False
            while not eof:
                buf = await free_recv.receive()
                n = 0
                with memoryview(buf) as view:
                    while n < buffer_size:
                        k = await source.readinto(view[n:])
                        if k == 0:
                            eof = True
                            break
                        n += k
                if n:
                    try:
                        await full_send.send((buf, n))
                    except trio.BrokenResourceError:
                        return  # the writer failed and closed its end: its error counts

    async def writer() -> None:
        nonlocal total
        async with full_recv:
            async for buf, n in full_recv:
                await trio.to_thread.run_sync(_write_chunk, sink, taps, buf, n)
                total += n
                free_send.send_nowait(buf)

    start = time.monotonic()
    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                nursery.start_soon(writer)
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        await source.commit()
        await trio.to_thread.run_sync(sink.commit)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(sink.abort)
            await source.abort()
        raise
    finally:
        close_pool(pool)
    return PumpStats(total, time.monotonic() - start)


def run_trio(job: Callable[[], Awaitable[T]]) -> T:
    """Run ``job`` under trio; SIGTERM, SIGINT and SIGHUP cancel it (so both ends are
    aborted and temporaries removed) and surface as :class:`Interrupted`."""
    import signal

    import trio

    from ._errors import Interrupted

    async def main() -> T:
        result: list[T] = []
        async with trio.open_nursery() as nursery:

            async def work() -> None:
                result.append(await job())
                nursery.cancel_scope.cancel()

            async def signals() -> None:
                sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
                with trio.open_signal_receiver(*sigs) as it:
                    async for signum in it:
                        raise Interrupted(f"interrupted by {signal.Signals(signum).name}")

            nursery.start_soon(signals)
            nursery.start_soon(work)
        return result[0]

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        raise _first_error(group) from None
