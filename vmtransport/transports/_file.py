"""``file:PATH[,offset=N]`` — buffered regular-file I/O."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import ClassVar, final

from .._errors import io_error
from .._io import FileSource, write_all
from .._transport import SeekableSink, Sink, Source, ThreadedSource, Transport
from .._uri import URI
from ._target import AtomicTarget


@final
class FileSink(SeekableSink):
    def __init__(self, target: AtomicTarget) -> None:
        self._target = target
        self.rewritable = target.rewritable
        self._written = 0

    def write(self, data: memoryview) -> None:
        try:
            write_all(self._target.fd, data)
        except OSError as exc:
            raise io_error(f"writing {self._target.label}", exc) from exc
        self._written += len(data)

    def rewrite(self, offset: int, data: memoryview) -> None:
        self._target.rewrite(offset, data)

    def commit(self) -> None:
        self._target.commit(self._written)

    def abort(self) -> None:
        self._target.abort()

    def cancel(self) -> None:
        self._target.cancel()


def open_for_reading(path: str, offset: int, label: str, extra_flags: int = 0) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | extra_flags)
    except OSError as exc:
        raise io_error(f"opening {label}", exc) from exc
    try:
        if offset:
            os.lseek(fd, offset, os.SEEK_SET)
    except OSError as exc:
        os.close(fd)
        raise io_error(f"seeking {label}", exc) from exc
    return fd


@final
class FileTransport(Transport):
    scheme = "file"
    summary = "regular file, buffered; saves are atomic (temporary + rename)"
    options: ClassVar[Mapping[str, str]] = {
        "offset": "byte offset of the stream in the file (bytes before it are kept)",
        "format": "what a save writes: image (default: header, checksum) or raw (bare stream)",
    }

    def __init__(self, uri: URI) -> None:
        super().__init__(uri)
        self.save_format = self.choice_option("format", ("image", "raw"))
        self.offset = self.int_option("offset", 0)

    def open_sink(self) -> Sink:
        target = AtomicTarget(self.uri.target, self.offset, str(self.uri))
        target.open()
        return FileSink(target)

    def open_threaded_source(self) -> ThreadedSource:
        fd = open_for_reading(self.uri.target, self.offset, str(self.uri))
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass
        return FileSource(fd, str(self.uri))

    async def open_source(self) -> Source:
        import trio

        # In a thread: opening a FIFO blocks until a writer comes, and the event loop
        # must keep running meanwhile (the conformance suite's event-loop check).
        return await trio.to_thread.run_sync(self.open_threaded_source)
