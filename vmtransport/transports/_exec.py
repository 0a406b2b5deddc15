"""``exec:CMD`` — ``/bin/sh -c CMD`` as QEMU runs it.

Save feeds the command's stdin (and succeeds only if the command read all of it and
exited 0: see ExecSink); restore reads its stdout. Its stderr passes through to
ours and its last lines are kept: a non-zero exit becomes an error quoting them.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
from typing import final

from .. import _log
from .._errors import CommandError, TransportError, io_error
from .._io import FdSink, FdSource
from .._transport import Sink, Source, Transport

_TAIL_LINES = 5


class _Child:
    """The running command, with a thread teeing its stderr and keeping the tail."""

    def __init__(self, cmd: str, label: str, *, stdin: bool) -> None:
        # Imported here: loading the built-in transports must stay cheap (see _buffers).
        import subprocess
        import threading

        self.label = label
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        try:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", cmd],
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=None if stdin else subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
            )
        except OSError as exc:
            raise TransportError(f"{label}: cannot run /bin/sh: {exc.strerror}") from exc
        self._tee = threading.Thread(target=self._pump_stderr, daemon=True)
        self._tee.start()

    def take(self, pipe: object) -> int:
        """Own a dup of one of the child's pipe ends (the file object is closed)."""
        fd = os.dup(pipe.fileno())  # type: ignore[attr-defined]
        pipe.close()  # type: ignore[attr-defined]
        return fd

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:  # closed at EOF: no fd (or ResourceWarning) left behind
            for raw in self.proc.stderr:
                if _log.stderr_hook is not None:  # a progress bar or JSON lines own it
                    _log.stderr_line(raw.decode(errors="replace"))
                    continue
                try:
                    sys.stderr.buffer.write(raw)
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
                line = raw.decode(errors="replace").strip()
                if line:
                    self.tail.append(line)

    def wait(self) -> int:
        code = self.proc.wait()
        self._tee.join(timeout=5)
        return code

    def failure(self, code: int, when: str = "") -> CommandError:
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        tail = " | ".join(self.tail)
        return CommandError(f"{self.label}: command {how}{when}" + (f": {tail}" if tail else ""))

    def finish(self) -> None:
        code = self.wait()
        if code != 0:
            raise self.failure(code)

    def terminate(self) -> None:
        """SIGTERM, without waiting (from any thread)."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
        except OSError:
            pass

    def kill(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.wait()


@final
class ExecSink(Sink):
    """Feeds the command's stdin. Commit succeeds only if the command took the whole
    stream and exited 0: it waits until the command has read every byte left in the
    pipe (for as long as the command runs: no time limit, cancel stops it), then closes
    the pipe and waits for the exit. A command that exits, with any status, while bytes
    of the stream are still unread in its pipe (``head -c 100``) fails the save."""

    def __init__(self, child: _Child) -> None:
        self._child = child
        self._out = FdSink(child.take(child.proc.stdin), child.label)
        self._out.stall = None  # the command is ours: wait as long as it runs

    def write(self, data: memoryview) -> None:
        try:
            self._out.write(data)
        except TransportError:
            # A broken pipe means the command went away: its status says more.
            self._out.abort()
            raise self._child.failure(
                self._child.wait(), " before taking the whole stream"
            ) from None

    def commit(self) -> None:
        try:
            left = self._out.unread(lambda: self._child.proc.poll() is not None)
        except OSError as exc:
            raise io_error(f"ending {self._child.label}", exc) from exc
        try:
            self._out.commit()
        finally:
            code = self._child.wait()
        if code != 0:
            raise self._child.failure(code, " before taking the whole stream" if left else "")
        if left:
            raise CommandError(
                f"{self._child.label}: the command exited 0 but left {left} bytes of the "
                "stream unread"
            )

    def abort(self) -> None:
        self._out.abort()
        self._child.kill()

    def cancel(self) -> None:
        # A write blocked on the command's full stdin returns (EPIPE) once it is gone;
        # commit's wait for the command to read the rest ends too.
        self._out.cancel()
        self._child.terminate()


@final
class ExecSource(Source):
    def __init__(self, child: _Child) -> None:
        self._child = child
        self._in = FdSource(child.take(child.proc.stdout), child.label)

    async def readinto(self, buf: memoryview) -> int:
        return await self._in.readinto(buf)

    async def commit(self) -> None:
        import trio

        await self._in.commit()
        await trio.to_thread.run_sync(self._child.finish, abandon_on_cancel=True)

    async def abort(self) -> None:
        import trio

        await self._in.abort()
        await trio.to_thread.run_sync(self._child.kill, abandon_on_cancel=True)


@final
class ExecTransport(Transport):
    scheme = "exec"
    summary = "a shell command (/bin/sh -c): save feeds its stdin, restore reads its stdout"
    raw_target = True

    def open_sink(self) -> Sink:
        return ExecSink(_Child(self.uri.target, str(self.uri), stdin=True))

    async def open_source(self) -> Source:
        return ExecSource(_Child(self.uri.target, str(self.uri), stdin=False))
