"""One pipeline per direction: a source's bytes pass a stage into a sink.

::

    save:     QEMU's stream (stdin, a pipe) -> StreamWriter/ImageWriter -> transport sink
    restore:  transport source -> VerifyingReader -> stdout (or a save stage: copy)

A fixed pool of page-aligned buffers circulates between the two ends (see ``_buffers``):
the source side fills a free buffer completely, the *writer thread* hands it to the sink
(through the data taps) and gives it back. When the sink is slow the pool runs dry and
the source stops reading: back-pressure reaches the producer through the pipe, and
memory stays at ``buffers * buffer_size`` whatever the stream.

The source side is a :class:`~._buffers.BlockingReader` thread (a save's stdin, a file
source) or, for sources that need the event loop (pipes, sockets, ``exec:``), a trio
task. The sink is always driven from the pipeline's own writer thread, which alone calls
``write``, ``commit`` and ``abort``: so :meth:`Pipeline.cancel` can return while a write
is stuck on a stalled disk or a full pipe, and the descriptor it writes to is closed only
once that write has returned (the writer thread aborts the sink when it gets back).

Observers: :meth:`Pipeline.on_progress` (bytes and rate after each buffer) and
:meth:`Pipeline.on_event` (state changes) are called from the writer thread.
"""

from __future__ import annotations

import _thread
import mmap
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final, NamedTuple, TypeVar

from ._buffers import (
    BUFFER_SIZE,
    BUFFERS,
    BlockingReader,
    aligned_buffer,
    check_geometry,
    close_pool,
    source_reader,
)
from ._errors import Interrupted, StreamError, VMTransportError
from ._transport import Sink, Source, ThreadedSource, Transport

if TYPE_CHECKING:
    import _queue

Tap = Callable[[memoryview], None]
T = TypeVar("T")

#: :meth:`Pipeline.cancel` returns within this many seconds, whatever the sink does
CANCEL_WAIT: Final = 0.9


class PumpStats(NamedTuple):
    bytes: int
    seconds: float

    @property
    def mib_per_s(self) -> float:
        return self.bytes / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


class Progress(NamedTuple):
    """Bytes handed to the sink so far, and the seconds since the pipeline started."""

    bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        """Bytes per second, on average since the start."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


class StateEvent(NamedTuple):
    """A pipeline's state change: ``state`` is one of :data:`STATES`; ``detail`` says
    more (the error's message for ``failed``)."""

    state: str
    detail: str = ""
    bytes: int = 0


#: started: the writer runs; eof: the source ended (every byte read); committing: the
#: sink is being committed; complete, failed, cancelled: the end (exactly one of them)
STATES: Final = ("started", "eof", "committing", "complete", "failed", "cancelled")

_SourceLike = BlockingReader | Source | Transport


class Pipeline:
    """Move ``source`` into ``sink`` once; commit the sink on success, abort it otherwise.

    ``source``: a started :class:`BlockingReader` (its buffers are the pool), a
    :class:`Source` (a :class:`ThreadedSource` is read by reader threads, any other on
    the trio event loop), or a :class:`Transport` whose source is opened when the run
    starts. ``taps`` see every chunk, in order, before the sink does; one that raises
    fails the run. Run it with :meth:`run` (blocking, from any thread; a source that
    needs the event loop gets a trio loop of its own) or :meth:`run_async` (trio).
    """

    def __init__(
        self,
        source: _SourceLike,
        sink: Sink,
        *,
        label: str = "the source",
        taps: Sequence[Tap] = (),
        buffer_size: int = BUFFER_SIZE,
        buffers: int = BUFFERS,
    ) -> None:
        check_geometry(buffer_size, buffers)
        self.source = source
        self.sink = sink
        self.label = label
        self._taps = list(taps)
        self._geometry = (buffer_size, buffers)
        self._progress: list[Callable[[Progress], None]] = []
        self._events: list[Callable[[StateEvent], None]] = []
        self._reader: BlockingReader | None = None
        self._full: _queue.SimpleQueue[tuple[mmap.mmap, int] | None] | None = None
        self._source_error: BaseException | None = None
        self._source_done = False  # an async source was committed
        self._cancelled = False
        self._started = False
        self._finished = _thread.allocate_lock()  # held while the writer thread runs
        self._notify: Callable[[], None] | None = None  # wakes run_async's loop
        self._start = 0.0
        self.total = 0
        self.state = "ready"
        self.error: BaseException | None = None
        self.stats: PumpStats | None = None

    # -- observers
    def on_progress(self, callback: Callable[[Progress], None]) -> None:
        """Call ``callback`` after each buffer reached the sink (from the writer thread:
        keep it short; it must not raise)."""
        self._progress.append(callback)

    def on_event(self, callback: Callable[[StateEvent], None]) -> None:
        """Call ``callback`` on every state change (see :data:`STATES`)."""
        self._events.append(callback)

    def _check_not_started(self) -> None:
        if self._started:
            raise RuntimeError("the pipeline has started")

    def _emit(self, state: str, detail: str = "") -> None:
        self.state = state
        event = StateEvent(state, detail, self.total)
        for callback in self._events:
            try:
                callback(event)
            except Exception:  # an observer never breaks the stream
                pass

    # -- running
    def _begin(self) -> None:
        self._check_not_started()
        self._started = True
        self._start = time.monotonic()

    def _threaded_reader(self) -> BlockingReader | None:
        """The reader threads for this source, or None when it needs the event loop."""
        source = self.source
        if isinstance(source, BlockingReader):
            return source
        if isinstance(source, Transport):
            threaded = source.open_threaded_source()
            if threaded is None:
                return None
            self.source = source = threaded
        if isinstance(source, ThreadedSource):
            return source_reader(source, self.label, *self._geometry)
        return None

    def run(self) -> PumpStats:
        """Run to the end (blocking). Signals that raise in this thread (the CLI's
        SIGTERM) cancel the run (see :meth:`cancel`) and propagate."""
        self._begin()
        try:
            reader = self._threaded_reader()
        except BaseException:
            self._abort_unstarted()
            raise
        if reader is None:
            self._started = False
            return run_trio(self.run_async)
        self._start_writer(reader)
        try:
            self._finished.acquire()  # interruptible: a signal's exception lands here
            self._finished.release()
        except BaseException:
            self.cancel()
            if self.finished:
                self._close_threaded_source()
            raise
        self._close_threaded_source()
        return self._outcome()

    def _close_threaded_source(self) -> None:
        # Only once the writer has ended: the reader threads are stopped by then (a read
        # still in flight fails on the closed descriptor, harmlessly: pread moves no
        # offset). After a cancel that left the writer stuck, the source stays open.
        if isinstance(self.source, ThreadedSource):
            self.source.close()

    async def run_async(self) -> PumpStats:
        """Run to the end from a trio task; cancelling the task cancels the run (it
        returns within :data:`CANCEL_WAIT` seconds even if the sink's write is stuck)."""
        import trio

        if not self._started:
            self._begin()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def notify() -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        self._notify = notify
        try:
            reader = self._threaded_reader()
            if isinstance(self.source, Transport):
                self.source = await self.source.open_source()
        except BaseException:
            self._abort_unstarted()
            raise
        try:
            if reader is not None:
                self._start_writer(reader)
                await done.wait()
            else:
                await self._run_async_source(done)
        except BaseException:
            self._request_cancel()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(CANCEL_WAIT):
                    await done.wait()
                await self._end_source(ok=False)
            raise
        await self._end_source(ok=self.error is None)
        return self._outcome()

    async def _run_async_source(self, done: object) -> None:
        """Read an async source on the event loop; the writer thread writes."""
        import _queue

        import trio

        assert isinstance(done, trio.Event)
        source = self.source
        assert isinstance(source, Source)
        size, count = self._geometry
        pool = [aligned_buffer(size) for _ in range(count)]
        free_send, free_recv = trio.open_memory_channel[mmap.mmap](count)
        for b in pool:
            free_send.send_nowait(b)
        token = trio.lowlevel.current_trio_token()

        def give_back(buf: mmap.mmap) -> None:  # from the writer thread
            try:
                token.run_sync_soon(free_send.send_nowait, buf)
            except trio.RunFinishedError:
                pass

        full: _queue.SimpleQueue[tuple[mmap.mmap, int] | None] = _queue.SimpleQueue()

        async def read() -> None:
            try:
                eof = False
                while not eof:
                    buf = await free_recv.receive()
                    n = 0
                    with memoryview(buf) as view:
                        while n < size:
                            k = await source.readinto(view[n:])
                            if k == 0:
                                eof = True
                                break
                            n += k
                    if n:
                        full.put((buf, n))
                # Before the sink may commit: a producer that fails at the very end (an
                # exec: command's exit status) keeps the sink from being committed.
                await source.commit()
                self._source_done = True
            except trio.Cancelled:
                raise
            except BaseException as exc:  # the writer ends the run with it
                self._source_error = exc
            full.put(None)

        self._start_writer(None, full=full, give_back=give_back, pool=pool)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await done.wait()
            nursery.cancel_scope.cancel()

    async def _end_source(self, *, ok: bool) -> None:
        source = self.source
        if isinstance(source, BlockingReader):
            return
        if isinstance(source, ThreadedSource):
            source.close()
        elif isinstance(source, Source) and not (ok and self._source_done):
            await source.abort()

    def _abort_unstarted(self) -> None:
        """The run failed before the writer thread started: end what was opened."""
        source = self.source
        if isinstance(source, BlockingReader):
            source.discard()
        elif isinstance(source, ThreadedSource):
            source.close()
        try:
            self.sink.abort()
        except Exception:
            pass
        self._emit("failed", "could not start")

    def _start_writer(
        self,
        reader: BlockingReader | None,
        *,
        full: _queue.SimpleQueue[tuple[mmap.mmap, int] | None] | None = None,
        give_back: Callable[[mmap.mmap], None] | None = None,
        pool: list[mmap.mmap] | None = None,
    ) -> None:
        if reader is not None:
            self._reader = reader
            full, give_back, pool = reader.full, reader.free.put, reader.pool
        assert full is not None and give_back is not None and pool is not None
        self._full = full
        self._finished.acquire()
        _thread.start_new_thread(self._write, (full, give_back, pool))

    def _write(
        self,
        full: _queue.SimpleQueue[tuple[mmap.mmap, int] | None],
        give_back: Callable[[mmap.mmap], None],
        pool: list[mmap.mmap],
    ) -> None:
        """The writer thread: the only caller of the sink's methods."""
        sink, taps = self.sink, self._taps
        try:
            self._emit("started")
            depth = sink.enable_write_behind()
            held: deque[mmap.mmap] = deque()
            while not self._cancelled and (item := full.get()) is not None:
                buf, n = item
                view = memoryview(buf)[:n]
                # Views are not released explicitly: a failing write's traceback may
                # still hold slices of them (release() would raise over the real error).
                for tap in taps:
                    tap(view)
                sink.write(view)
                del view
                self.total += n
                # A sink with write-behind may still read the latest ``depth`` buffers.
                held.append(buf)
                while len(held) > depth:
                    give_back(held.popleft())
                if self._progress:
                    progress = Progress(self.total, time.monotonic() - self._start)
                    for callback in self._progress:
                        try:
                            callback(progress)
                        except Exception:
                            pass
            if self._cancelled:
                raise Interrupted(f"{self.label}: cancelled")
            self._check_source_end()
            self._emit("eof")
            self._emit("committing")
            sink.commit()
            self.stats = PumpStats(self.total, time.monotonic() - self._start)
            self._emit("complete")
        except BaseException as exc:
            self.error = exc
            if self._reader is not None:
                self._reader.stop()
            try:
                sink.abort()
            except BaseException:
                pass
            self._emit("cancelled" if self._cancelled else "failed", str(exc))
        finally:
            if self._reader is not None:
                self._reader.close()  # buffers a reader thread still reads into stay
            else:
                close_pool(pool)
            self._finished.release()
            if self._notify is not None:
                self._notify()

    def _check_source_end(self) -> None:
        reader = self._reader
        if reader is not None:
            if reader.error is not None:
                raise reader.error
            magic = reader.magic
            if magic and not magic.startswith(reader.head):
                # The reader stopped at the first bytes that cannot start a stream.
                raise StreamError(
                    f"{self.label}: not a QEMU migration stream: starts {reader.head.hex()}, "
                    f"expected {magic.hex()}"
                )
        elif self._source_error is not None:
            raise self._source_error

    def _request_cancel(self) -> None:
        """Ask the run to stop, without waiting (thread-safe; repeatable)."""
        if self._cancelled:
            return
        self._cancelled = True
        if self._reader is not None:
            self._reader.stop()
        if self._full is not None:
            self._full.put(None)  # wakes a writer waiting for data; it sees _cancelled
        try:
            self.sink.cancel()
        except Exception:
            pass

    def cancel(self) -> None:
        """Stop the run: nothing is committed, the sink is aborted. Thread-safe.

        Returns within :data:`CANCEL_WAIT` seconds. A write stuck in the kernel (a
        stalled disk, a full pipe nobody reads) cannot be interrupted from here: the
        writer thread aborts the sink when that write returns (the sink's ``cancel``
        may hurry it, e.g. by stopping an ``exec:`` child), and until then the
        descriptor stays open, so no thread ever writes into a closed one.
        """
        if not self._started:
            self._cancelled = True
            return
        self._request_cancel()
        if self._finished.acquire(timeout=CANCEL_WAIT):
            self._finished.release()

    @property
    def finished(self) -> bool:
        """The writer thread has ended (the sink was committed or aborted)."""
        if self._finished.acquire(blocking=False):
            self._finished.release()
            return self._started
        return False

    def _outcome(self) -> PumpStats:
        if self.error is not None:
            raise self.error
        if self.stats is None:  # cancelled, the writer still stuck in the sink
            raise Interrupted(f"{self.label}: cancelled")
        return self.stats


def _first_error(exc: BaseException) -> BaseException:
    """Unwrap nursery exception groups to the error a user should see."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        ours = [e for e in exc.exceptions if isinstance(_first_error(e), VMTransportError)]
        exc = _first_error(ours[0] if ours else exc.exceptions[0])
    return exc


def pump_blocking(
    read: Callable[[memoryview], int | None] | BlockingReader,
    sink: Sink,
    *,
    label: str = "the source",
    taps: Sequence[Tap] = (),
    buffer_size: int = BUFFER_SIZE,
    buffers: int = BUFFERS,
) -> PumpStats:
    """Copy from a blocking ``read`` function (or a started :class:`BlockingReader`) to
    ``sink`` until EOF, on threads; commit it, or abort it on any error."""
    reader = (
        read
        if isinstance(read, BlockingReader)
        else BlockingReader(read, label=label, buffer_size=buffer_size, buffers=buffers)
    )
    return Pipeline(reader, sink, label=label, taps=taps).run()


async def pump(
    source: Source,
    sink: Sink,
    *,
    taps: Sequence[Tap] = (),
    buffer_size: int = BUFFER_SIZE,
    buffers: int = BUFFERS,
) -> PumpStats:
    """Copy ``source`` to ``sink`` from a trio task; commit both on success, abort both
    otherwise (the source first: a producer that fails at the end keeps the sink from
    being committed). Cancelling the task aborts both ends."""
    pipeline = Pipeline(
        source, sink, label="the source", taps=taps, buffer_size=buffer_size, buffers=buffers
    )
    return await pipeline.run_async()


def run_trio(job: Callable[[], Awaitable[T]]) -> T:
    """Run ``job`` under trio; SIGTERM, SIGINT and SIGHUP cancel it (so both ends are
    aborted and temporaries removed) and surface as :class:`Interrupted`."""
    import signal

    import trio

    async def main() -> T:
        result: list[T] = []
        async with trio.open_nursery() as nursery:

            async def work() -> None:
                result.append(await job())
                nursery.cancel_scope.cancel()

            async def signals(task_status: trio.TaskStatus[None]) -> None:
                sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
                with trio.open_signal_receiver(*sigs) as it:
                    task_status.started()
                    async for signum in it:
                        exc = Interrupted(f"interrupted by {signal.Signals(signum).name}")
                        exc.signum = signum
                        raise exc

            # The job starts once the signals are trio's: it may unblock signals kept
            # pending until then (the fast restore, see ``_handoff``).
            await nursery.start(signals)
            nursery.start_soon(work)
        return result[0]

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        raise _first_error(group) from None
