"""Decompressing a compressed libvirt save image's stream, with the compressor's own
program, as libvirt does it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, final

from .._errors import StreamError, TransportError

#: libvirt's compression format -> the program that decompresses it (``-dc``)
TOOLS: Final = {"gzip": "gzip", "bzip2": "bzip2", "xz": "xz", "lzop": "lzop", "zstd": "zstd"}


@final
class Decompressor:
    """A decompressing child (as libvirt runs one): we feed its stdin from the writer
    thread; a thread moves its stdout on to the stream consumer."""

    def __init__(self, tool: str, label: str, consume: Callable[[memoryview], None]) -> None:
        import subprocess
        import threading

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
        self.error: BaseException | None = None
        self._consume = consume
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        try:
            while chunk := self.proc.stdout.read1(1 << 20):  # type: ignore[attr-defined]
                with memoryview(chunk) as view:
                    self._consume(view)
        except BaseException as exc:
            self.error = exc
            self.proc.kill()

    def feed(self, data: memoryview) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
        except BrokenPipeError:
            self.finish()  # raises why it stopped
            raise StreamError(f"{self.label}: the decompressor stopped early") from None

    def finish(self) -> None:
        assert self.proc.stdin is not None and self.proc.stderr is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self._thread.join()
        # One line, as every error message: bzip2 and others explain over many.
        lines = self.proc.stderr.read().decode(errors="replace").splitlines()
        err = " | ".join([ln.strip() for ln in lines if ln.strip()][:5])
        code = self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        if self.error is not None:
            raise self.error
        if code != 0:
            raise StreamError(f"{self.label}: decompression failed (status {code}): {err}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.finish()
        except BaseException:
            pass
