"""A minimal vmtransport plugin to copy: ``example:PATH``, a plain file.

Everything a transport must do, and nothing more (docs/plugins.md has the rules):

- a save writes a temporary beside PATH (created 0600, never following a symlink) and
  renames it to PATH only in ``commit``, after ``fsync``: a save that fails or is
  cancelled leaves nothing under PATH;
- errors are :class:`vmtransport.TransportError` naming the URI;
- a restore reads in worker threads (:class:`vmtransport.ThreadedSource`), so the trio
  event loop never blocks on the disk.

It passes vmtransport's conformance suite (``tests/test_example_plugin.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import final

import vmtransport


def _error(uri: object, what: str, exc: OSError) -> vmtransport.TransportError:
    return vmtransport.TransportError(f"{uri}: {what}: {exc.strerror or exc}")


@final
class ExampleSink(vmtransport.Sink):
    """Called from the pipeline's writer thread: it may block."""

    def __init__(self, uri: vmtransport.URI) -> None:
        self.uri = uri
        self.path = uri.target
        self.tmp = f"{self.path}.{os.getpid()}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.fd: int | None = os.open(self.tmp, flags, 0o600)
        except OSError as exc:
            raise _error(uri, "cannot create", exc) from exc

    def write(self, data: memoryview) -> None:
        assert self.fd is not None
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as exc:
            raise _error(self.uri, "writing", exc) from exc

    def commit(self) -> None:
        assert self.fd is not None
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            os.rename(self.tmp, self.path)  # the stream is whole: now it has its name
        except OSError as exc:
            raise _error(self.uri, "committing", exc) from exc

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


@final
class ExampleSource(vmtransport.ThreadedSource):
    """Read from worker threads (``read_blocking``), never on the event loop."""

    def __init__(self, uri: vmtransport.URI, fd: int) -> None:
        self.uri = uri
        self.fd = fd

    def read_blocking(self, buf: memoryview) -> int:
        try:
            return os.readv(self.fd, [buf])  # 0 only at the end of the file
        except OSError as exc:
            raise _error(self.uri, "reading", exc) from exc

    def close(self) -> None:
        os.close(self.fd)


@final
class ExampleTransport(vmtransport.Transport):
    scheme = "example"
    summary = "example plugin: a plain file, written atomically"

    def open_sink(self) -> vmtransport.Sink:
        return ExampleSink(self.uri)

    async def open_source(self) -> vmtransport.Source:
        import trio  # the restore side runs on trio; open() may block, so in a thread

        return await trio.to_thread.run_sync(self.open_threaded_source)

    def open_threaded_source(self) -> vmtransport.ThreadedSource:
        try:
            fd = os.open(self.uri.target, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _error(self.uri, "cannot open", exc) from exc
        return ExampleSource(self.uri, fd)


@vmtransport.hookimpl
def vmtransport_transports() -> Sequence[type[vmtransport.Transport]]:
    return [ExampleTransport]
