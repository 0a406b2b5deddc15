"""``odirect:PATH[,offset=N][,fallback=buffered|error]`` — O_DIRECT both ways.

Saving a large guest through the page cache evicts the host's working set; O_DIRECT
keeps the image out of it. Buffers come aligned from the pump; the stream's unaligned
tail is written through a zero-padded block and the file truncated to the true length.
Filesystems that refuse O_DIRECT (ramfs: EINVAL) get buffered I/O that writes back
and drops its pages as it goes, with one warning, unless ``fallback=error``.

Character devices and FIFOs have no page cache to keep clean: they are read and written
in place with plain I/O (no O_DIRECT, no warning, no sync), as ``file:`` does; a save to
one is not atomic. A directory is refused at once, before anything is opened.
"""

from __future__ import annotations

import _queue
import errno
import fcntl
import mmap
import os
import stat
import time
from collections.abc import Callable, Mapping
from typing import ClassVar, final

from .. import _log
from .._buffers import Worker, aligned_buffer
from .._errors import TransportError, io_error
from .._io import DIRECT_ALIGN, FileSource, drop_cache, write_all
from .._transport import SeekableSink, Sink, Source, ThreadedSource, Transport
from .._uri import URI
from ._file import FileSink, open_for_reading
from ._target import AtomicTarget

_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4
#: buffered fallback: write back and drop the page cache every this many bytes
_DROP_WINDOW = 32 << 20
_STAGE = 1 << 20


def _warn_fallback(label: str, exc: OSError) -> None:
    _log.warning(
        "%s: the filesystem refuses O_DIRECT (%s); using buffered I/O that drops its pages",
        label,
        exc.strerror,
    )


class _InFlight:
    """Two O_DIRECT writes in flight, from two threads: :meth:`submit` hands a write to
    a thread and returns once the write before it is done, so the next request is
    queued while this one runs and the disk does not sit idle between requests."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._jobs: list[_queue.SimpleQueue[tuple[memoryview, int] | None]] = []
        self._done: list[_queue.SimpleQueue[OSError | None]] = []
        for _ in range(2):
            self._jobs.append(_queue.SimpleQueue())
            self._done.append(_queue.SimpleQueue())
        self._busy = [False, False]
        self._next = 0
        self._workers = [Worker(self._serve, i) for i in (0, 1)]

    def _serve(self, i: int) -> None:
        jobs, done = self._jobs[i], self._done[i]
        while (job := jobs.get()) is not None:
            data, pos = job
            del job
            err: OSError | None = None
            try:
                while data:
                    n = os.pwrite(self._fd, data, pos)
                    data, pos = data[n:], pos + n
            except Exception as exc:
                if not isinstance(exc, OSError):  # never leave the caller waiting
                    exc = OSError(errno.EIO, f"{type(exc).__name__}: {exc}")
                err = exc.with_traceback(None)  # its frames would hold views of the buffer
            del data  # before saying done: the pump's buffer is the caller's again
            done.put(err)

    def _wait(self, i: int, timeout: float | None = None) -> None:
        if self._busy[i]:
            err = self._done[i].get(timeout=timeout)
            self._busy[i] = False
            if err is not None:
                raise err

    def submit(self, data: memoryview, pos: int) -> None:
        """Start writing ``data`` at ``pos``; return once the write before it is done
        (raising that write's error)."""
        i = self._next
        self._wait(i)  # the write before the previous one: done, unless a wait was interrupted
        self._jobs[i].put((data, pos))
        self._busy[i] = True
        self._next = 1 - i
        self._wait(1 - i)

    def drain(self) -> None:
        """Wait for every write; raise the first error."""
        first: OSError | None = None
        for i in (self._next, 1 - self._next):  # oldest first
            try:
                self._wait(i)
            except OSError as exc:
                first = first or exc
        if first is not None:
            raise first

    def close(self, timeout: float = 10.0) -> bool:
        """Wait (up to ``timeout`` seconds in all) for writes in flight, ignore their
        errors, and stop the threads; False when a write still hangs."""
        end = time.monotonic() + timeout
        settled = True
        for i in (0, 1):
            try:
                self._wait(i, max(0.0, end - time.monotonic()))
            except OSError:
                pass
            except _queue.Empty:  # a write hangs: leave it
                settled = False
            self._jobs[i].put(None)
        for worker in self._workers:
            settled = worker.join(max(0.0, end - time.monotonic())) and settled
        return settled


@final
class DirectSink(SeekableSink):
    def __init__(self, target: AtomicTarget, direct: bool) -> None:
        self._t = target
        self.rewritable = target.rewritable
        self._direct = direct
        self._written = 0
        self._pad = aligned_buffer(DIRECT_ALIGN)  # a block not yet whole: written at the end
        self._carry = 0  # bytes in _pad
        self._stage: mmap.mmap | None = None  # for buffers that are not page aligned
        self._synced = 0  # buffered fallback: bytes written back and dropped
        self._flight: _InFlight | None = None  # write-behind (enable_write_behind)
        if not direct:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.sync_file_range.argtypes = [
                ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
            ]
            self._sync_range = libc.sync_file_range

    def enable_write_behind(self) -> int:
        if not self._direct:
            return 0
        if self._flight is None:
            self._flight = _InFlight(self._t.fd)
        return 1

    def _settle(self) -> None:
        """Before a synchronous write: the writes in flight are done, and the file
        position (pwrite leaves it alone) is where they ended."""
        if self._flight is not None:
            self._flight.drain()
            os.lseek(self._t.fd, self._t.offset + self._written - self._carry, os.SEEK_SET)

    def _write_direct(self, data: memoryview) -> None:
        # The pump hands page-aligned buffers of whole blocks: they go straight to the
        # disk, two in flight once write-behind is on (the pump's own buffers only).
        # Anything else (a copy from a libvirt image, whose stream starts at an odd
        # offset) is carried or staged through aligned memory.
        if self._flight is not None and not self._carry and not len(data) % DIRECT_ALIGN:
            self._flight.submit(data, self._t.offset + self._written)
            return
        self._settle()
        fd = self._t.fd
        if self._carry:
            take = min(DIRECT_ALIGN - self._carry, len(data))
            self._pad[self._carry : self._carry + take] = data[:take]
            self._carry += take
            data = data[take:]
            if self._carry < DIRECT_ALIGN:
                return
            write_all(fd, memoryview(self._pad))
            self._carry = 0
        cut = len(data) - len(data) % DIRECT_ALIGN
        if cut:
            try:
                write_all(fd, data[:cut])
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._write_staged(data[:cut])  # EINVAL: the buffer is not page aligned
        if cut < len(data):
            self._carry = len(data) - cut
            self._pad[: self._carry] = data[cut:]

    def _write_staged(self, data: memoryview) -> None:
        if self._stage is None:
            self._stage = aligned_buffer(_STAGE)
        for pos in range(0, len(data), _STAGE):
            piece = data[pos : pos + _STAGE]
            self._stage[: len(piece)] = piece
            with memoryview(self._stage) as stage:
                write_all(self._t.fd, stage[: len(piece)])

    def _flush_tail(self) -> None:
        """The last, partial block: zero-padded and written whole; commit truncates."""
        if self._carry:
            self._pad[self._carry :] = bytes(DIRECT_ALIGN - self._carry)
            write_all(self._t.fd, memoryview(self._pad))
            self._carry = 0

    def _write_buffered(self, data: memoryview) -> None:
        write_all(self._t.fd, data)
        end = self._written + len(data)
        base = self._t.offset
        # Start write-back of what was just written; wait for and drop the window before.
        if end - self._synced >= 2 * _DROP_WINDOW:
            start = self._synced
            stop = end - _DROP_WINDOW
            self._sync_range(self._t.fd, base + stop, end - stop, _SFR_WRITE)
            self._sync_range(
                self._t.fd,
                base + start,
                stop - start,
                _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER,
            )
            drop_cache(self._t.fd, base + start, stop - start)
            self._synced = stop

    def write(self, data: memoryview) -> None:
        try:
            if self._direct:
                self._write_direct(data)
            else:
                self._write_buffered(data)
        except OSError as exc:
            raise io_error(f"writing {self._t.label}", exc) from exc
        self._written += len(data)

    def rewrite(self, offset: int, data: memoryview) -> None:
        self._t.rewrite(offset, data)

    def commit(self) -> None:
        if self._direct:
            try:
                self._settle()
                if self._flight is not None:
                    self._flight.close()
                    self._flight = None
                self._flush_tail()
            except OSError as exc:
                self.abort()
                raise io_error(f"writing {self._t.label}", exc) from exc
        else:
            try:
                os.fdatasync(self._t.fd)
            except OSError as exc:
                self._t.abort()
                raise io_error(f"syncing {self._t.label}", exc) from exc
            drop_cache(self._t.fd)
        self._t.commit(self._written)

    def abort(self) -> None:
        settled = True
        if self._flight is not None:
            settled = self._flight.close()
            self._flight = None
        # A write that hangs in a flight thread keeps the descriptor: closing it could
        # let that write land in whatever file reuses the number.
        self._t.abort(close=settled)

    def cancel(self) -> None:
        self._t.cancel()


@final
class DirectSource(ThreadedSource):
    """O_DIRECT reads into the pump's aligned buffers.

    The file size is taken at open: reads stop there, so no O_DIRECT read is ever issued
    at an unaligned position after a short read at the end.
    """

    def __init__(self, fd: int, label: str, pos: int, size: int) -> None:
        self._fd = fd
        self._label = label
        self._pos = pos
        self._size = size

    def read_blocking(self, buf: memoryview) -> int:
        if self._pos >= self._size:
            return 0
        if self._pos % DIRECT_ALIGN:
            raise TransportError(f"reading {self._label}: unaligned O_DIRECT position")
        n = self.read_at(buf, self._pos)
        self._pos += n
        return n

    def read_at(self, buf: memoryview, pos: int) -> int:
        try:
            return os.preadv(self._fd, [buf], pos)
        except OSError as exc:
            raise io_error(f"reading {self._label}", exc) from exc

    def parallel_reads(self) -> tuple[Callable[[memoryview, int], int], int, int]:
        return self.read_at, self._pos, self._size

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1


@final
class _DroppingSource(ThreadedSource):
    """Buffered fallback for reads: drops what it has read from the page cache."""

    def __init__(self, inner: FileSource, offset: int) -> None:
        self._inner = inner
        self._pos = offset
        self._dropped = offset

    def read_blocking(self, buf: memoryview) -> int:
        n = self._inner.read_blocking(buf)
        self._pos += n
        if self._pos - self._dropped >= _DROP_WINDOW or n == 0:
            drop_cache(self._inner.fd, self._dropped, self._pos - self._dropped)
            self._dropped = self._pos
        return n

    def close(self) -> None:
        self._inner.close()


@final
class ODirectTransport(Transport):
    scheme = "odirect"
    summary = "regular file or block device with O_DIRECT: saves leave no page cache behind"
    options: ClassVar[Mapping[str, str]] = {
        "offset": f"byte offset of the stream (a multiple of {DIRECT_ALIGN})",
        "fallback": "what to do where O_DIRECT is refused: buffered (default, warns) or error",
        "format": "what a save writes: image (default: header, checksum) or raw (bare stream)",
    }

    def __init__(self, uri: URI) -> None:
        super().__init__(uri)
        self.save_format = self.choice_option("format", ("image", "raw"))
        self.offset = self.int_option("offset", 0, multiple_of=DIRECT_ALIGN)
        self.fallback = self.choice_option("fallback", ("buffered", "error"))

    def _refused(self, exc: OSError) -> None:
        if self.fallback == "error":
            raise TransportError(
                f"{self.uri}: the filesystem refuses O_DIRECT ({exc.strerror}) and "
                "fallback=error"
            ) from exc
        _warn_fallback(str(self.uri), exc)

    def _kind(self) -> str:
        """"dir", "plain" (a character device or FIFO: no page cache, no O_DIRECT) or
        "direct" (anything else, including a path that does not exist yet)."""
        try:
            mode = os.stat(self.uri.target).st_mode
        except OSError:
            return "direct"  # opening it says what is wrong
        if stat.S_ISDIR(mode):
            raise TransportError(f"{self.uri}: is a directory")
        return "plain" if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) else "direct"

    def open_sink(self) -> Sink:
        plain = self._kind() == "plain"
        target = AtomicTarget(self.uri.target, self.offset, str(self.uri))
        fd = target.open()
        if plain and target.in_place and not target.rewritable:
            return FileSink(target)  # (checked again on the open descriptor)
        try:
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_DIRECT)
            direct = True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                target.abort()
                raise io_error(f"opening {self.uri}", exc) from exc
            try:
                self._refused(exc)
            except BaseException:
                target.abort()
                raise
            direct = False
        return DirectSink(target, direct)

    async def open_source(self) -> Source:
        import trio

        # In a thread: opening a FIFO blocks until a writer comes, and the event loop
        # must keep running meanwhile (the conformance suite's event-loop check).
        return await trio.to_thread.run_sync(self.open_threaded_source)

    def open_threaded_source(self) -> ThreadedSource:
        label = str(self.uri)
        if self._kind() == "plain":
            return FileSource(open_for_reading(self.uri.target, self.offset, label), label)
        try:
            fd = open_for_reading(self.uri.target, 0, label, os.O_DIRECT)
        except TransportError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, OSError) and cause.errno == errno.EINVAL):
                raise
            self._refused(cause)
            fd = open_for_reading(self.uri.target, self.offset, label)
            return _DroppingSource(FileSource(fd, label), self.offset)
        size = os.fstat(fd).st_size
        if size == 0:  # block device: ask its size
            size = os.lseek(fd, 0, os.SEEK_END)
        return DirectSource(fd, label, self.offset, size)
