"""The buffer pool and its reader threads: what a save helper starts first.

QEMU blocks as soon as the pipe to a save helper is full (1 MiB), so the helper starts
reading QEMU's stream into this pool right after parsing its command line, and imports
the rest of the package while the stream flows (see ``_cli``). Hence this module imports
C modules only (and ``_errors``, which imports nothing): ``_thread`` and ``_queue``
rather than ``threading`` and ``queue``, no ``typing`` at run time — each of those costs
milliseconds of a migration that is blocked.
"""

from __future__ import annotations

import _queue
import _thread
import fcntl
import mmap
import os
import stat

from ._errors import io_error  # no imports of its own

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Final

    from ._transport import ThreadedSource

PAGE: Final = mmap.PAGESIZE
PIPE_SIZE: Final = 1 << 20
BUFFER_SIZE: Final = 8 << 20
#: 64 MiB: absorbs the helper's start-up (the imports after the reader starts) at the
#: rate QEMU produces, and keeps a helper's RSS well under 100 MiB.
BUFFERS: Final = 8
#: Reads in flight for a file source (see BlockingReader's ``at``).
READ_DEPTH: Final = 3
_HUGE_PAGE: Final = 2 << 20
#: A reader that checksums hashes what it read in pieces of at least this size, right
#: after reading them: they are still in the CPU's cache (L2 is 1 MiB here).
_HASH_STEP: Final = 256 << 10


def new_hasher() -> Any:
    """The image checksum's algorithm: XXH3-128."""
    import xxhash

    return xxhash.xxh3_128()


class Checksum:
    """The checksum of a stream, and how many bytes it covers."""

    __slots__ = ("_hasher", "length")

    def __init__(self) -> None:
        self._hasher: Any = None  # created on the first update: loading xxhash costs start-up time
        self.length = 0

    def _get(self) -> Any:
        if self._hasher is None:
            self._hasher = new_hasher()
        return self._hasher

    def update(self, data: memoryview) -> None:
        self._get().update(data)
        self.length += len(data)

    def digest(self) -> bytes:
        digest: bytes = self._get().digest()
        return digest


class _FreeList:
    """The pool's free buffers, last in first out: the buffer taken next is the one
    written out last, still warm in the CPU's caches and TLB, and a steady stream cycles
    through as few buffers as it needs rather than the whole pool. A queue's interface,
    built from ``_queue`` (see the module's docstring)."""

    def __init__(self) -> None:
        self._items: list[mmap.mmap | None] = []
        self._count: _queue.SimpleQueue[None] = _queue.SimpleQueue()

    def put(self, item: mmap.mmap | None) -> None:
        self._items.append(item)  # before the count: a get() always finds an item
        self._count.put(None)

    def get(self) -> mmap.mmap | None:
        self._count.get()
        return self._items.pop()


def aligned_buffer(size: int) -> mmap.mmap:
    """Anonymous page-aligned memory: usable as an O_DIRECT buffer.

    Backed by transparent huge pages where the kernel offers them (``madvise`` mode):
    fewer TLB misses for the copy out of the pipe, cheaper page pinning, and O_DIRECT
    requests of few, large segments: O_DIRECT reads into such buffers ran about twice as
    fast as into 4 KiB pages (docs/performance.md, "Figures cited from the code").
    Private mappings only: shared anonymous memory is shmem, which gets no huge pages.
    """
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= _HUGE_PAGE:
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass
    return buf


def grow_pipe(fd: int, size: int = PIPE_SIZE) -> int:
    """Grow a pipe's capacity (the largest single win for throughput); return the size.

    Best effort: an unprivileged process is capped by /proc/sys/fs/pipe-max-size.
    Not a pipe, or refused: return 0 and leave it alone.
    """
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return 0
        cur = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        if cur >= size:
            return cur
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        try:
            return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        except OSError:
            return 0


def check_geometry(buffer_size: int, buffers: int) -> None:
    if buffer_size % PAGE or buffer_size <= 0 or buffers < 2:
        raise ValueError(f"bad pump geometry: {buffers} x {buffer_size} bytes")


def fd_reader(fd: int) -> Callable[[memoryview], int | None]:
    """The read function for a :class:`BlockingReader` from a descriptor: one C call per
    read (QEMU writes its stream a few KiB at a time). A pipe is grown to 1 MiB first."""
    import io  # already loaded by the interpreter: free

    grow_pipe(fd)
    return io.FileIO(fd, "rb", closefd=False).readinto


def _wait_readable(read: Callable[[memoryview], int | None]) -> None:
    import select

    raw = getattr(read, "__self__", None)
    if raw is not None and hasattr(raw, "fileno"):
        select.select([raw.fileno()], [], [])


class BlockingReader:
    """Fills the pump's buffers from a blocking ``read`` function, in a thread of its own.

    The reader fills a free buffer completely (so O_DIRECT writes are whole aligned
    blocks; only the last is short) and queues it on ``full``; whoever drains ``full``
    puts buffers back on ``free``. ``None`` on ``full`` marks the end (then see
    ``error``). ``read`` is called for every few KiB QEMU writes, so it should be a bare
    C method (``FileIO.readinto``, see :func:`fd_reader`); an OSError from it becomes a
    TransportError naming ``label``. With ``magic``, a stream whose first bytes differ
    is not read any further (:attr:`head` shows them, and the stream ends there).

    ``at=(pread, start, end)`` instead reads the bytes ``start:end`` of a file with
    ``pread(buf, pos)``, ``depth`` buffers at once (``read`` is then unused): one O_DIRECT
    read at a time leaves the disk idle between requests (docs/performance.md has the
    figures; the pool's huge pages matter more, see aligned_buffer).

    ``checksum=True`` (sequential reads only): :attr:`checksum` accumulates the hash of
    every byte read, computed in this thread right after each read, while the bytes are
    in the CPU's cache. In the consumer's thread, a whole buffer later, the same hash
    reads the buffer back from memory, whose bandwidth a save shares with QEMU and the
    disk (docs/semantics.md has the probe). Whoever does not need it sets ``checksum``
    to None: hashing stops at the next buffer.
    """

    HEAD: Final = 4  #: as many as QEMU's magic

    def __init__(
        self,
        read: Callable[[memoryview], int | None],
        *,
        label: str = "the source",
        magic: bytes = b"",
        buffer_size: int = BUFFER_SIZE,
        buffers: int = BUFFERS,
        at: tuple[Callable[[memoryview, int], int], int, int] | None = None,
        depth: int = READ_DEPTH,
        checksum: bool = False,
    ) -> None:
        check_geometry(buffer_size, buffers)
        if checksum and at is not None:
            raise ValueError("BlockingReader: a checksum needs sequential reads")
        self.checksum = Checksum() if checksum else None
        self._read = read
        self.magic = magic  #: what the stream must start with (b"": anything)
        self.label = label
        self._size = buffer_size
        self.pool = [aligned_buffer(buffer_size) for _ in range(buffers)]
        self.free = _FreeList()
        self.full: _queue.SimpleQueue[tuple[mmap.mmap, int] | None] = _queue.SimpleQueue()
        for b in self.pool:
            self.free.put(b)
        self.error: BaseException | None = None
        self.head = b""  #: the stream's first bytes (up to HEAD), for a magic check
        self._done = False  # stop(), or the end reached (parallel reads)
        # Held until every reader thread has returned (see join).
        self._exited = _thread.allocate_lock()
        self._exited.acquire()
        self._count_lock = _thread.allocate_lock()
        if at is None:
            self._threads = self._alive = 1
            _thread.start_new_thread(self._thread, (self._run,))
            return
        # One lock per thread: thread i may queue its buffer only while it holds
        # turns[i], and passes the turn on to the next: buffers arrive in file order.
        # claims[i] does the same for taking a free buffer.
        self._threads = self._alive = max(1, depth)
        self._turns = [_thread.allocate_lock() for _ in range(self._threads)]
        self._claims = [_thread.allocate_lock() for _ in range(self._threads)]
        for lock in self._turns[1:] + self._claims[1:]:
            lock.acquire()
        for i in range(self._threads):
            _thread.start_new_thread(self._thread, (self._run_at, i, *at))

    def _thread(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        finally:
            with self._count_lock:
                self._alive -= 1
                if self._alive == 0:
                    self._exited.release()

    def join(self, timeout: float) -> bool:
        """Wait until every reader thread has returned: only then may the descriptor
        they read be closed (a later read would hit whatever reuses its number).
        False if one is still inside a read after ``timeout`` seconds."""
        if self._exited.acquire(timeout=timeout):
            self._exited.release()
            return True
        return False

    def _run(self) -> None:
        read, size, magic = self._read, self._size, self.magic
        try:
            eof = False
            while not eof:
                buf = self.free.get()
                if buf is None:  # stop()
                    return
                checksum = self.checksum
                n = hashed = 0
                with memoryview(buf) as view:
                    while n < size:
                        if checksum is not None and n - hashed >= _HASH_STEP:
                            checksum.update(view[hashed:n])
                            hashed = n
                        k = read(view[n:])
                        if not k:
                            if k is None:  # EAGAIN: someone made it non-blocking
                                _wait_readable(read)
                                continue
                            eof = True
                            break
                        if len(self.head) < self.HEAD:
                            self.head += bytes(view[n : n + min(k, self.HEAD - len(self.head))])
                            if magic and not magic.startswith(self.head):
                                return  # junk: ``head`` shows it, and the consumer refuses it
                        n += k
                    if checksum is not None and n > hashed:
                        checksum.update(view[hashed:n])
                if n:
                    self.full.put((buf, n))
                else:
                    self.free.put(buf)
        except BaseException as exc:
            self._fail(exc)
        finally:
            self.full.put(None)

    def _run_at(
        self, i: int, pread: Callable[[memoryview, int], int], start: int, end: int
    ) -> None:
        size, step = self._size, self._threads
        turn, after = self._turns[i], self._turns[(i + 1) % step]
        claim, next_claim = self._claims[i], self._claims[(i + 1) % step]
        k = i  # this thread reads chunks i, i + step, i + 2 * step...
        try:
            while True:
                pos = start + k * size
                # Buffers go to chunks in file order too: were a later chunk to take the
                # last free buffer, the one the consumer waits for could never be read.
                claim.acquire()
                try:
                    buf = None if pos >= end else self.free.get()
                finally:
                    next_claim.release()
                n = 0
                error: BaseException | None = None
                if buf is not None:
                    try:
                        with memoryview(buf) as view:
                            want = min(size, end - pos)
                            while n < want:  # whole buffers: O_DIRECT wants aligned sizes
                                got = pread(view[n:], pos + n)
                                if not got:
                                    shrank = f"the file shrank to {pos + n} bytes as it was read"
                                    raise OSError(0, shrank)
                                n += got
                            n = min(n, want)
                    except BaseException as exc:
                        error = exc
                turn.acquire()  # every earlier chunk is queued (or the end is)
                try:
                    if self._done:
                        if buf is not None:
                            self.free.put(buf)
                        return
                    if buf is None or error is not None:
                        self._done = True
                        if error is not None:
                            self._fail(error)
                        self.full.put(None)
                        return
                    if k == 0:
                        self.head = bytes(buf[: min(n, self.HEAD)])
                    self.full.put((buf, n))
                finally:
                    after.release()
                k += step
        except BaseException as exc:  # free.get() interrupted: cannot happen in a thread
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, OSError):
            self.error = io_error(f"reading {self.label}", exc)
        else:
            self.error = exc

    def stop(self) -> None:
        """Stop at the next buffer boundary (a read in progress is left to finish)."""
        self._done = True
        for _ in range(self._threads):
            self.free.put(None)

    def close(self) -> None:
        close_pool(self.pool)

    def discard(self) -> None:
        """Give up before the pump ran: stop reading and release the buffers."""
        self.stop()
        self.close()


class Worker:
    """A thread that can be joined with a timeout, started with ``_thread``: the helpers'
    threads start while signals already raise Interrupted, and ``Thread.start()`` waits
    for the thread to come up — a signal's exception landing in that wait leaves a
    half-started thread behind."""

    def __init__(self, fn: Callable[..., object], *args: object) -> None:
        self._running = _thread.allocate_lock()  # held while the thread runs
        self._running.acquire()
        _thread.start_new_thread(self._run, (fn, args))

    def _run(self, fn: Callable[..., object], args: tuple[object, ...]) -> None:
        try:
            fn(*args)
        finally:
            self._running.release()

    def join(self, timeout: float = -1) -> bool:
        """Wait for the thread to end (interruptible: signals arrive here); False on
        timeout."""
        if not self._running.acquire(timeout=timeout):
            return False
        self._running.release()
        return True


def save_reader(fd: int) -> BlockingReader:
    """A started reader of a save's stream on ``fd`` (stdin): checks QEMU's magic, and
    checksums as it reads, for the image (see ``image.hash_as_read``)."""
    return BlockingReader(fd_reader(fd), label="stdin", magic=b"QEVM", checksum=True)


def source_reader(
    source: ThreadedSource, label: str, buffer_size: int = BUFFER_SIZE, buffers: int = BUFFERS
) -> BlockingReader:
    """A started reader of a blocking source: several reads at once where it allows."""
    return BlockingReader(
        source.read_blocking, label=label, at=source.parallel_reads(),
        buffer_size=buffer_size, buffers=buffers,
    )  # fmt: skip


def close_pool(pool: list[mmap.mmap]) -> None:
    for b in pool:
        try:
            b.close()
        except BufferError:
            # An error's traceback still holds a slice of it (write_all's ``data``): the
            # mapping is freed with that traceback. Raising here would mask the error.
            pass
