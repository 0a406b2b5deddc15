"""A blocking QMP connection on the sans-io :class:`~._protocol.Protocol`, without trio.

For the command line's first exchange: ``restore --qmp`` hands QEMU its stream before
it imports trio (every millisecond before QEMU's first byte is lost), then
:meth:`QMPClient.adopt <vmtransport.qmp.QMPClient.adopt>` takes the connection over,
with whatever this one read and nobody took. Same errors, same messages and the same
deadlines as the trio client: every blocking call has a timeout.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from .._errors import QMPConnectionError, QMPError
from ._protocol import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    MAX_LINE,
    Event,
    Greeting,
    Protocol,
    ProtocolViolation,
    Reply,
)

#: sun_path's size, with its terminating NUL
_SUN_PATH: Final = 108
RECV_BYTES: Final = 256 << 10


def _describe_mode(mode: int) -> str:
    kinds = {
        stat.S_IFREG: "a regular file",
        stat.S_IFDIR: "a directory",
        stat.S_IFIFO: "a FIFO",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
    }
    return kinds.get(stat.S_IFMT(mode), "not a socket")


def open_path(path: str) -> tuple[int, str]:
    """(an O_PATH descriptor of the socket at ``path``, the address to connect to): a
    path too long for sun_path is reached through /proc/self/fd. The caller closes the
    descriptor once connected. Raises QMPConnectionError for what is not a socket."""
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise QMPConnectionError(f"QMP monitor {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(pfd).st_mode
        if not stat.S_ISSOCK(mode):
            raise QMPConnectionError(f"QMP monitor {path}: not a socket ({_describe_mode(mode)})")
    except BaseException:
        os.close(pfd)
        raise
    short = len(os.fsencode(path)) < _SUN_PATH
    return pfd, path if short else f"/proc/self/fd/{pfd}"


def connect_failed(path: str, exc: OSError) -> QMPConnectionError:
    hint = (
        " (nothing listens on it: is QEMU running?)"
        if isinstance(exc, ConnectionRefusedError)
        else ""
    )
    return QMPConnectionError(f"QMP monitor {path}: cannot connect: {exc.strerror or exc}{hint}")


#: What the connection was doing when its deadline passed, for the message.
DOING: Final = {
    "connect": "could not connect",
    "greet": "sent no QMP greeting",
    "negotiate": "did not answer qmp_capabilities",
}


class SyncQMP:
    """One blocking QMP connection (from :func:`connect_sync`); not thread-safe. Events
    read while waiting for replies are kept in :attr:`events`, oldest first."""

    def __init__(self, sock: socket.socket, monitor: str, max_line: int = MAX_LINE) -> None:
        self.monitor = monitor
        self.sock = sock
        self.protocol = Protocol(max_line)
        self.greeting: Greeting | None = None
        self.events: list[Event] = []
        self.error: str | None = None  # why the connection is unusable
        self._replies: dict[int, Reply] = {}
        self._detached = False

    def _broken(self) -> QMPConnectionError:
        return QMPConnectionError(f"QMP monitor {self.monitor}: {self.error}")

    def _fail(self, reason: str) -> QMPConnectionError:
        if self.error is None:
            self.error = reason
        return self._broken()

    def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        fds: Sequence[int] = (),
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Any:
        """As :meth:`QMPClient.execute <vmtransport.qmp.QMPClient.execute>`, blocking:
        ``command``'s return value, QMPError if QEMU refuses it, QMPConnectionError if
        the connection breaks or no reply comes within ``timeout`` seconds."""
        try:
            reply = self._exchange(command, arguments, fds, time.monotonic() + timeout)
        except TimeoutError:
            # The connection stays usable: the late reply is dropped (abandoned).
            raise QMPConnectionError(
                f"QMP monitor {self.monitor}: no reply to {command} within {timeout:g} s"
            ) from None
        if reply.error is not None:
            raise QMPError(self.monitor, command, *reply.error)
        return reply.value

    def _exchange(
        self,
        command: str,
        arguments: Mapping[str, Any] | None,
        fds: Sequence[int],
        deadline: float,
    ) -> Reply:
        """Send ``command``, wait for its reply; TimeoutError at ``deadline``."""
        if self.error is not None:
            raise self._broken()
        cmd_id, line = self.protocol.command(command, arguments)
        answered = False
        try:
            self._send(command, line, fds, deadline)
            self._wait(lambda: cmd_id in self._replies, deadline)
            answered = True
            return self._replies.pop(cmd_id)
        finally:
            if not answered:
                self._replies.pop(cmd_id, None)
                self.protocol.abandon(cmd_id)

    def getfd(self, fd: int, fdname: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.execute("getfd", {"fdname": fdname}, fds=[fd], timeout=timeout)

    def _send(self, command: str, line: bytes, fds: Sequence[int], deadline: float) -> None:
        data = memoryview(line)
        try:
            if fds:
                # The descriptors ride on the first bytes of the command's own line.
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = data[socket.send_fds(self.sock, [data], list(fds)) :]
            while data:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = data[self.sock.send(data) :]
        except TimeoutError:
            raise  # (a monitor that reads nothing: no reply in time)
        except OSError as exc:
            raise self._fail(f"sending {command}: {exc.strerror or exc}") from None
        finally:
            if 0 < len(data) < len(line):
                self._fail(f"{command} was cut off while being sent")

    def _wait(self, done: Callable[[], bool], deadline: float) -> None:
        """Read and dispatch messages until ``done()``; TimeoutError at ``deadline``."""
        while not done():
            if self.error is not None:
                raise self._broken()
            try:
                msg = self.protocol.next_message()
                if msg is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    self.sock.settimeout(left)
                    data = self.sock.recv(RECV_BYTES)
                    if not data:
                        self.protocol.eof()  # always raises
                    self.protocol.feed(data)
                    continue
            except ProtocolViolation as exc:
                raise self._fail(str(exc)) from None
            except OSError as exc:
                raise self._fail(f"reading: {exc.strerror or 'closed'}") from None
            if isinstance(msg, Reply):
                self._replies[msg.id] = msg
            elif isinstance(msg, Event):
                self.events.append(msg)
            else:
                self.greeting = msg

    def detach(self) -> socket.socket:
        """Give up the socket (blocking, no timeout); the caller now owns it. The
        protocol's state and :attr:`events` stay readable for whoever takes over."""
        self._detached = True
        self.sock.settimeout(None)
        if self.error is None:
            self.error = "connection handed over"
        return self.sock

    def close(self) -> None:
        if not self._detached:
            self.sock.close()
        if self.error is None:
            self.error = "connection closed"


def connect_sync(
    path: str | os.PathLike[str],
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_line: int = MAX_LINE,
) -> SyncQMP:
    """As :func:`vmtransport.qmp.connect` for a socket's path, blocking: connected,
    greeted and negotiated within ``timeout`` seconds, or QMPConnectionError."""
    label = os.fspath(path)
    deadline = time.monotonic() + timeout
    pfd, address = open_path(label)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    stage = "connect"
    try:
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except TimeoutError:
            raise
        except OSError as exc:
            raise connect_failed(label, exc) from None
        finally:
            os.close(pfd)
        client = SyncQMP(sock, label, max_line)
        stage = "greet"
        client._wait(lambda: client.greeting is not None, deadline)
        stage = "negotiate"
        # No capabilities asked for: without "oob" QEMU runs commands one at a time, in
        # the order sent, which is what descriptor passing relies on.
        reply = client._exchange("qmp_capabilities", {}, (), deadline)
        if reply.error is not None:
            raise QMPError(label, "qmp_capabilities", *reply.error)
        return client
    except TimeoutError:
        sock.close()
        raise QMPConnectionError(
            f"QMP monitor {label}: {DOING[stage]} within {timeout:g} s"
        ) from None
    except BaseException:
        sock.close()
        raise
