"""Move a stream into a sink: reading overlaps writing.

A fixed pool of page-aligned buffers circulates between a reader and a writer: the
reader fills a free buffer completely (so O_DIRECT writes are whole aligned blocks; only
the last is short), the writer drains full ones in a worker thread. When the sink is
slow the pool runs dry and the reader stops reading: back-pressure reaches the producer
through the pipe, and memory stays at ``buffers * buffer_size`` whatever the stream.

Two drivers share that shape:

* :func:`pump_blocking` — threads only, from a blocking read function: a save helper's
  stdin (QEMU's migration thread writes it in blocking mode) or a restore helper's
  file (:class:`ThreadedSource`). It needs no event loop, so a helper starts in a few
  tens of milliseconds instead of paying for importing trio while QEMU waits.
* :func:`pump` — from an async :class:`Source` on the trio event loop (restore, copy).

Taps see every chunk, in order, before it is written (a stream parser, a checksum); a
tap that raises stops the pump and aborts both ends.
"""

from __future__ import annotations

import mmap
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, NamedTuple, TypeVar

from ._errors import VMTransportError
from ._io import aligned_buffer, grow_pipe
from ._transport import Sink, Source

BUFFER_SIZE: Final = 8 << 20
BUFFERS: Final = 4
#: seconds a failing pump_blocking waits for its writer thread before aborting the sink
_WRITER_GRACE: Final = 2.0

Tap = Callable[[memoryview], None]
T = TypeVar("T")


class PumpStats(NamedTuple):
    bytes: int
    seconds: float

    @property
    def mib_per_s(self) -> float:
        return self.bytes / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


def _write_chunk(sink: Sink, taps: Sequence[Tap], buf: mmap.mmap, n: int) -> None:
    with memoryview(buf) as whole, whole[:n] as view:
        for tap in taps:
            tap(view)
        sink.write(view)


def _close_pool(pool: Sequence[mmap.mmap]) -> None:
    for b in pool:
        try:
            b.close()
        except BufferError:
            # An error's traceback still holds a slice of it (write_all's ``data``): the
            # mapping is freed with that traceback. Raising here would mask the error.
            pass


def _check_geometry(buffer_size: int, buffers: int) -> None:
    if buffer_size % mmap.PAGESIZE or buffer_size <= 0 or buffers < 2:
        raise ValueError(f"bad pump geometry: {buffers} x {buffer_size} bytes")


def pump_blocking(
    read: Callable[[memoryview], int | None],
    sink: Sink,
    *,
    label: str = "the source",
    prefix: bytes = b"",
    taps: Sequence[Tap] = (),
    buffer_size: int = BUFFER_SIZE,
    buffers: int = BUFFERS,
) -> PumpStats:
    """Copy from blocking ``read`` to ``sink`` until EOF; commit it, or abort on any error.

    The calling thread reads; one worker thread writes. An exception raised in the
    calling thread (a signal handler's) aborts the sink as well. ``read`` is called for
    every few KiB QEMU writes, so it should be a bare C method (``FileIO.readinto``, see
    :func:`fd_reader`); an OSError from it becomes a TransportError naming ``label``.
    ``prefix``: bytes already read that start the stream.
    """
    from ._io import io_error

    _check_geometry(buffer_size, buffers)
    pool = [aligned_buffer(buffer_size) for _ in range(buffers)]
    free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
    full: queue.SimpleQueue[tuple[mmap.mmap, int] | None] = queue.SimpleQueue()
    for b in pool:
        free.put(b)
    failed: list[BaseException] = []
    total = 0

    def writer() -> None:
        nonlocal total
        while (item := full.get()) is not None:
            buf, n = item
            if not failed:
                try:
                    _write_chunk(sink, taps, buf, n)
                    total += n
                except BaseException as exc:
                    failed.append(exc)
            free.put(buf)  # after a failure keep recycling, so the reader never hangs

    start = time.monotonic()
    thread = threading.Thread(target=writer, name="vmtransport-writer", daemon=True)
    thread.start()
    try:
        try:
            eof = False
            while not eof and not failed:
                buf = free.get()
                n = len(prefix)
                buf[:n] = prefix
                prefix = b""
                with memoryview(buf) as view:
                    try:
                        while n < buffer_size:
                            k = read(view[n:])
                            if not k:
                                if k is None:  # EAGAIN: someone made it non-blocking
                                    _wait_readable(read)
                                    continue
                                eof = True
                                break
                            n += k
                    except OSError as exc:
                        raise io_error(f"reading {label}", exc) from exc
                if n:
                    full.put((buf, n))
                else:
                    free.put(buf)
        except BaseException:
            # The read side failed, or a signal handler raised: do not wait for a writer
            # stuck in a blocking write to a consumer that stopped reading (a SIGTERM
            # would go unheeded). The sink's abort below unblocks or orphans it; it is a
            # daemon thread.
            full.put(None)
            thread.join(timeout=_WRITER_GRACE)
            raise
        full.put(None)
        thread.join()
        if failed:
            raise failed[0]
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    finally:
        _close_pool(pool)
    return PumpStats(total, time.monotonic() - start)


def fd_reader(fd: int) -> Callable[[memoryview], int | None]:
    """The read function for :func:`pump_blocking` from a descriptor: one C call per read
    (QEMU writes its stream a few KiB at a time). A pipe is grown to 1 MiB first."""
    import io

    grow_pipe(fd)
    return io.FileIO(fd, "rb", closefd=False).readinto


def _wait_readable(read: Callable[[memoryview], int | None]) -> None:
    import select

    raw = getattr(read, "__self__", None)
    if raw is not None and hasattr(raw, "fileno"):
        select.select([raw.fileno()], [], [])


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

    _check_geometry(buffer_size, buffers)
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
        _close_pool(pool)
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
