"""Decompressing a compressed libvirt save image's stream, with the compressor's own
program, as libvirt does it."""

from __future__ import annotations

import os
import select
from collections.abc import Callable
from typing import Final, final

from .._errors import StreamError, TransportError

#: libvirt's compression format -> the program that decompresses it (``-dc``)
TOOLS: Final = {"gzip": "gzip", "bzip2": "bzip2", "xz": "xz", "lzop": "lzop", "zstd": "zstd"}
_CHUNK: Final = 1 << 20


@final
class Decompressor:
    """A decompressing child (as libvirt runs one), driven from the caller's thread:
    :meth:`feed` writes its stdin and hands what comes out of its stdout to ``consume``
    as it goes (both pipes non-blocking, one ``poll``), so the consumer is called from
    the thread that feeds, the pipeline's writer thread, like any other sink write."""

    def __init__(self, tool: str, label: str, consume: Callable[[memoryview], None]) -> None:
        import subprocess

        self.label = label
        try:
            self.proc = subprocess.Popen(
                [tool, "-dc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
        except OSError as exc:
            raise TransportError(
                f"{label}: libvirt image is {tool}-compressed and {tool} cannot run: "
                f"{exc.strerror}"
            ) from exc
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        for fd in (self._in, self._out):
            os.set_blocking(fd, False)
        self._consume = consume
        self._closed = False

    def _drain(self) -> bool:
        """Hand on what the child has written; False at its EOF."""
        while True:
            try:
                chunk = os.read(self._out, _CHUNK)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            with memoryview(chunk) as view:
                self._consume(view)

    def feed(self, data: memoryview) -> None:
        poller = select.poll()
        poller.register(self._in, select.POLLOUT)
        poller.register(self._out, select.POLLIN)
        while data:
            for fd, _ in poller.poll():
                if fd == self._out:
                    if not self._drain():
                        poller.unregister(self._out)
                    continue
                try:
                    n = os.write(self._in, data)
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    self.finish()  # raises why it stopped
                    raise StreamError(f"{self.label}: the decompressor stopped early") from None
                data = data[n:]
                if not data:
                    break
        self._drain()

    def finish(self) -> None:
        """End of input: hand on the rest of the output; raise if the child failed."""
        assert self.proc.stdin is not None and self.proc.stderr is not None
        if not self._closed:
            self._closed = True
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                while True:
                    select.select([self._out], [], [])
                    if not self._drain():
                        break
            finally:
                assert self.proc.stdout is not None
                self.proc.stdout.close()
        # One line, as every error message: bzip2 and others explain over many.
        lines = self.proc.stderr.read().decode(errors="replace").splitlines()
        self.proc.stderr.close()
        err = " | ".join([ln.strip() for ln in lines if ln.strip()][:5])
        code = self.proc.wait()
        if code != 0:
            raise StreamError(f"{self.label}: decompression failed (status {code}): {err}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self.proc.wait()
