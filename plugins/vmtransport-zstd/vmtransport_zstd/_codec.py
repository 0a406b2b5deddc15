"""The zstd sink and sources. Layout (README.md)::

    0        the stream's first 64 KiB as written (a vmtransport image's header region,
             which the image writer rewrites at commit); zero-padded when shorter
    65536    zstd frames of the rest of the stream (none when it is that short)
    end-24   a zstd skippable frame: magic 0x184D2A5E, size 16, b"VMTZSTD1", the
             stream's length (u64 LE): the proof that the compressed part is whole

zstd itself skips the trailer: ``tail -c +65537 IMAGE | zstd -dc`` is the stream after
its first 64 KiB.
"""

from __future__ import annotations

import _thread
import mmap
import queue
import struct
from collections.abc import Callable
from typing import IO, Final, cast, final

import zstandard

from vmtransport import (
    SeekableSink,
    Sink,
    Source,
    StreamError,
    ThreadedSource,
    TransportError,
    VMTransportError,
)

#: bytes at the start stored as they are: the image header region (rewritten at commit)
PREFIX: Final = 64 * 1024
SKIPPABLE_MAGIC: Final = 0x184D2A5E
TRAILER_ID: Final = b"VMTZSTD1"
TRAILER: Final = struct.Struct("<II8sQ")
#: compressed bytes handed to the inner sink at once: page aligned, whole 4 KiB blocks
#: (an O_DIRECT inner sink writes them as they are); the last write is shorter
OUT_CHUNK: Final = 4 << 20
#: zstd's job per worker thread. Its default at level 3 (8 MiB) holds ~70 MiB in
#: flight with 2 workers; 1 MiB holds ~14 MiB, and compresses as well here (within
#: 0.2% of single-threaded zstd, smaller on the benchmark's RAM) and faster.
JOB_SIZE: Final = 1 << 20
#: compressed bytes read from the inner source at once (a multiple of 4 KiB)
IN_CHUNK: Final = 1 << 20


def named(label: str, exc: VMTransportError) -> VMTransportError:
    """``exc`` naming the whole URI (``zstd:odirect:/x``), not only the inner one."""
    if label in str(exc):
        return exc
    try:
        new = type(exc)(f"{label}: {exc}")
    except TypeError:  # a subclass with a constructor of its own
        new = TransportError(f"{label}: {exc}")
    new.__cause__ = exc
    return new


def trailer(length: int) -> bytes:
    return TRAILER.pack(SKIPPABLE_MAGIC, TRAILER.size - 8, TRAILER_ID, length)


@final
class ZstdSink(SeekableSink):
    """Save: the first :data:`PREFIX` bytes as they are, then zstd on ``threads``
    workers (zstd's own; 0: in the writer thread), into ``inner``.

    A :class:`~vmtransport.SeekableSink` that can rewrite inside its prefix when the
    inner sink can rewrite at all: the image writer's header rewrite goes through.
    """

    def __init__(self, inner: Sink, label: str, level: int, threads: int) -> None:
        self._inner = inner
        self.label = label
        self.rewritable = isinstance(inner, SeekableSink) and inner.rewritable
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=threads, job_size=JOB_SIZE if threads else 0, write_checksum=1
        )
        self._cctx = zstandard.ZstdCompressor(compression_params=params)
        self._cobj: zstandard.ZstdCompressionObj | None = None
        self._prefix = mmap.mmap(-1, PREFIX)  # page aligned, as O_DIRECT wants
        self._out = mmap.mmap(-1, OUT_CHUNK)
        self._fill = 0  # bytes waiting in _out
        self.length = 0  #: stream bytes taken so far

    def write(self, data: memoryview) -> None:
        try:
            self._write(data)
        except VMTransportError as exc:
            raise named(self.label, exc) from exc.__cause__

    def _write(self, data: memoryview) -> None:
        if self.length < PREFIX:
            take = min(PREFIX - self.length, len(data))
            self._prefix[self.length : self.length + take] = data[:take]
            self.length += take
            if self.length == PREFIX:
                self._inner.write(memoryview(self._prefix))
            data = data[take:]
            if not data:
                return
        if self._cobj is None:
            self._cobj = self._cctx.compressobj()
        self.length += len(data)
        try:
            out = self._cobj.compress(data)
        except zstandard.ZstdError as exc:
            raise TransportError(f"{self.label}: zstd compression failed: {exc}") from None
        self._emit(out)

    def _emit(self, out: bytes) -> None:
        view = memoryview(out)
        while view:
            take = min(OUT_CHUNK - self._fill, len(view))
            self._out[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == OUT_CHUNK:
                self._inner.write(memoryview(self._out))
                self._fill = 0

    def rewrite(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        if not self.rewritable or end > PREFIX:
            raise TransportError(
                f"{self.label}: cannot rewrite bytes {offset}-{end}: only the first {PREFIX} "
                "are stored as written, on a target that can be rewritten"
            )
        if self.length < PREFIX:  # not written yet: change what will be
            self._prefix[offset:end] = data
            return
        assert isinstance(self._inner, SeekableSink)
        try:
            self._inner.rewrite(offset, data)
        except VMTransportError as exc:
            raise named(self.label, exc) from exc.__cause__

    def commit(self) -> None:
        try:
            self._commit()
        except VMTransportError as exc:
            raise named(self.label, exc) from exc.__cause__

    def _commit(self) -> None:
        if self.length < PREFIX:  # a short stream: the prefix zero-padded
            self._prefix[self.length :] = bytes(PREFIX - self.length)
            self._inner.write(memoryview(self._prefix))
        if self._cobj is not None:
            try:
                self._emit(self._cobj.flush())
            except zstandard.ZstdError as exc:
                raise TransportError(f"{self.label}: zstd compression failed: {exc}") from None
        self._emit(trailer(self.length))
        if self._fill:
            self._inner.write(memoryview(self._out)[: self._fill])
            self._fill = 0
        self._inner.commit()

    def abort(self) -> None:
        self._inner.abort()

    def cancel(self) -> None:
        self._inner.cancel()


@final
class _Prefetcher:
    """Reads the inner source ahead in a thread of its own, so that the disk works while
    the reader thread decompresses (zstd's own tool overlaps them the same way)."""

    DEPTH: Final = 4

    def __init__(self, fill: Callable[[memoryview], int]) -> None:
        self._fill = fill
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(self.DEPTH)
        self._stop = False
        self._running = _thread.allocate_lock()  # held while the thread runs
        self._running.acquire()
        # _thread, not threading.Thread: start() waits for the thread to come up, and a
        # signal's exception landing in that wait would leave it half started.
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        try:
            buf = mmap.mmap(-1, IN_CHUNK)  # page aligned, for O_DIRECT reads
            while not self._stop:
                n = self._fill(memoryview(buf))
                self._put(buf[:n])
                if not n:
                    break
        except BaseException as exc:
            self._put(exc.with_traceback(None))
        finally:
            self._running.release()

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self) -> bytes:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._stop = True
            raise item
        return item

    def close(self, timeout: float = 10.0) -> bool:
        """Stop reading; False when a read still hangs after ``timeout`` seconds (the
        inner source must then stay open: its descriptor is in use)."""
        self._stop = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if not self._running.acquire(timeout=timeout):
            return False
        self._running.release()
        return True


@final
class _Decoder:
    """Restore, blocking: the prefix, then the decompressed rest, with ``fill(buf)``
    reading the inner source (into page-aligned buffers of whole 4 KiB blocks, so an
    O_DIRECT source reads them as they are)."""

    def __init__(
        self, fill: Callable[[memoryview], int], label: str, *, prefetch: bool = False
    ) -> None:
        def named_fill(buf: memoryview) -> int:
            try:
                return fill(buf)
            except VMTransportError as exc:
                raise named(label, exc) from exc.__cause__

        self._fill = named_fill
        self.label = label
        self._prefetch = prefetch
        self._prefetcher: _Prefetcher | None = None
        self._prefix = mmap.mmap(-1, PREFIX)
        self._in = mmap.mmap(-1, IN_CHUNK)
        self._avail = -1  # prefix bytes that are stream bytes (-1: not read yet)
        self._served = 0  # prefix bytes handed out
        self._pending = b""  # compressed bytes read while peeking
        self._tail = b""  # the last TRAILER.size compressed bytes read
        self._reader: zstandard.ZstdDecompressionReader | None = None
        self._inner_eof = False
        self.length = 0  #: stream bytes handed out
        self._done = False

    def _read_inner(self) -> bytes:
        if self._inner_eof:
            return b""
        if self._prefetcher is not None:
            chunk = self._prefetcher.get()
        else:
            chunk = self._in[: self._fill(memoryview(self._in))]
        if not chunk:
            self._inner_eof = True
        self._tail = (self._tail + chunk[-TRAILER.size :])[-TRAILER.size :]
        return chunk

    def read(self, size: int = -1) -> bytes:
        """For zstandard's stream reader: the next compressed bytes."""
        if self._pending:
            chunk, self._pending = self._pending, b""
            return chunk
        return self._read_inner()

    def _truncated(self, what: str) -> StreamError:
        return StreamError(f"{self.label}: truncated zstd image ({what})")

    def _start(self) -> None:
        view = memoryview(self._prefix)
        got = 0
        while got < PREFIX and (n := self._fill(view[got:])):
            got += n
        if got < PREFIX:
            raise self._truncated(f"{got} of the first {PREFIX} bytes")
        if self._prefetch:
            self._prefetcher = _Prefetcher(self._fill)
        head = b""
        while len(head) < TRAILER.size and (chunk := self._read_inner()):
            head += chunk
        magic = struct.unpack_from("<I", head)[0] if len(head) >= 4 else None
        if magic == SKIPPABLE_MAGIC:  # a trailer alone: a stream of at most PREFIX bytes
            length = self._check_trailer(head)
            if length > PREFIX or self._read_inner():
                raise StreamError(f"{self.label}: not a zstd image (bad trailer)")
            self._avail = length
            self._done = True
            return
        if len(head) < TRAILER.size:
            raise self._truncated("no trailer")
        self._avail = PREFIX
        self._pending = head
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            cast("IO[bytes]", self),  # zstandard calls only read(size)
            read_size=IN_CHUNK,
            read_across_frames=True,
            closefd=False,
        )

    def _check_trailer(self, data: bytes) -> int:
        if len(data) != TRAILER.size:
            raise self._truncated("no trailer")
        magic, size, ident, length = TRAILER.unpack(data)
        if (magic, size, ident) != (SKIPPABLE_MAGIC, TRAILER.size - 8, TRAILER_ID):
            raise self._truncated("no trailer")
        return int(length)

    def readinto(self, buf: memoryview) -> int:
        if self._avail < 0:
            self._start()
        if self._served < self._avail:
            n = min(len(buf), self._avail - self._served)
            buf[:n] = self._prefix[self._served : self._served + n]
            self._served += n
            self.length += n
            return n
        if self._done or self._reader is None:
            return 0
        try:
            n = self._reader.readinto(buf)
        except zstandard.ZstdError as exc:
            raise StreamError(f"{self.label}: the compressed data is damaged: {exc}") from None
        if n:
            self.length += n
            return n
        # zstd stops quietly at a frame cut short: the trailer proves nothing is missing
        if not self._inner_eof and self._read_inner():
            raise StreamError(f"{self.label}: data after the zstd trailer")
        length = self._check_trailer(self._tail)
        if length != self.length:
            raise self._truncated(f"{self.length} of {length} bytes")
        self._done = True
        return 0

    def close(self) -> bool:
        """Stop reading ahead; False if the inner source is still in use."""
        return self._prefetcher is None or self._prefetcher.close()


@final
class ZstdThreadedSource(ThreadedSource):
    """Restore from a source that reads files: blocking reads, decompressed in the
    reader thread while a thread of its own reads the compressed bytes ahead."""

    def __init__(self, inner: ThreadedSource, label: str) -> None:
        self._inner = inner
        self._decoder = _Decoder(inner.read_blocking, label, prefetch=True)

    def read_blocking(self, buf: memoryview) -> int:
        return self._decoder.readinto(buf)

    def close(self) -> None:
        # A read that hangs in the prefetching thread keeps the descriptor: closing it
        # could let that read land in whatever file reuses the number.
        if self._decoder.close():
            self._inner.close()


@final
class ZstdSource(Source):
    """Restore from an event-loop source (a pipe, a socket): decompression runs in a
    worker thread, which reads the inner source back on the event loop."""

    def __init__(self, inner: Source, label: str) -> None:
        import trio

        self._inner = inner

        def fill(buf: memoryview) -> int:
            return trio.from_thread.run(inner.readinto, buf)

        self._decoder = _Decoder(fill, label)

    async def readinto(self, buf: memoryview) -> int:
        import trio

        return await trio.to_thread.run_sync(self._decoder.readinto, buf)

    async def commit(self) -> None:
        await self._inner.commit()

    async def abort(self) -> None:
        await self._inner.abort()


__all__ = ["PREFIX", "ZstdSink", "ZstdSource", "ZstdThreadedSource", "trailer"]
