"""A blocking QMP connection on the sans-io :class:`~._protocol.Protocol`, without trio.

For the command line's first exchange: ``restore --qmp`` hands QEMU its stream before
it imports trio (every millisecond before QEMU's first byte is lost), then
:meth:`QMPClient.adopt <vmtransport.qmp.QMPClient.adopt>` takes the connection over,
with whatever this one read and nobody took. Same errors, same messages and the same
deadlines as the trio client: every blocking call has a timeout.

:func:`open_sync` only connects; :meth:`SyncQMP.negotiate` reads the greeting and sends
``qmp_capabilities`` with any further commands in one write, so that a caller can do its
own work while QEMU accepts and greets, and pay one round trip for the lot. ``_socket``,
not ``socket``: the latter's import costs milliseconds here.
"""

from __future__ import annotations

import _socket
import array
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from operator import contains
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

    def __init__(
        self,
        sock: _socket.socket,
        monitor: str,
        max_line: int = MAX_LINE,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.monitor = monitor
        self.sock = sock
        self.protocol = Protocol(max_line)
        self.greeting: Greeting | None = None
        self.events: list[Event] = []
        self.error: str | None = None  # why the connection is unusable
        self._replies: dict[int, Reply] = {}
        self._detached = False
        self.timeout = timeout  # for connecting, greeting and negotiating
        self.deadline = time.monotonic() + timeout

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
                fdarray = array.array("i", fds).tobytes()
                ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fdarray)]
                data = data[self.sock.sendmsg([data], ancillary) :]
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
            except TimeoutError:
                raise  # (the caller says what was late)
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

    def negotiate(
        self, *then: tuple[str, Mapping[str, Any] | None], timeout: float = DEFAULT_TIMEOUT
    ) -> list[Any]:
        """Read the greeting and send ``qmp_capabilities`` (both before the connection's
        deadline), and in the same write the commands ``then`` (name, arguments): their
        return values, in order, or the first one's QMPError; ``timeout`` bounds each."""
        stage = "greet"
        commands = [("qmp_capabilities", {}), *then]
        ids: list[int] = []
        try:
            try:
                self._wait(lambda: self.greeting is not None, self.deadline)
                stage = "negotiate"
                lines = []
                for name, arguments in commands:
                    cmd_id, line = self.protocol.command(name, arguments)
                    ids.append(cmd_id)
                    lines.append(line)
                self._send("qmp_capabilities", b"".join(lines), (), self.deadline)
                self._wait(lambda: ids[0] in self._replies, self.deadline)
            except TimeoutError:
                raise QMPConnectionError(
                    f"QMP monitor {self.monitor}: {DOING[stage]} within {self.timeout:g} s"
                ) from None
            values = []
            for (name, _), cmd_id in zip(commands, ids, strict=True):
                try:
                    self._wait(partial(contains, self._replies, cmd_id), time.monotonic() + timeout)
                except TimeoutError:
                    raise QMPConnectionError(
                        f"QMP monitor {self.monitor}: no reply to {name} within {timeout:g} s"
                    ) from None
                reply = self._replies.pop(cmd_id)
                if reply.error is not None:
                    raise QMPError(self.monitor, name, *reply.error)
                values.append(reply.value)
            return values[1:]
        finally:
            for cmd_id in ids:  # the replies nobody waits for any more
                if self._replies.pop(cmd_id, None) is None:
                    self.protocol.abandon(cmd_id)

    def detach(self) -> _socket.socket:
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


def open_sync(
    path: str | os.PathLike[str],
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_line: int = MAX_LINE,
) -> SyncQMP:
    """Connect to the QMP socket at ``path``; :meth:`SyncQMP.negotiate` must follow,
    within ``timeout`` seconds of this call. QMPConnectionError if that fails."""
    label = os.fspath(path)
    pfd, address = open_path(label)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except TimeoutError:
        sock.close()
        raise QMPConnectionError(
            f"QMP monitor {label}: {DOING['connect']} within {timeout:g} s"
        ) from None
    except OSError as exc:
        sock.close()
        raise connect_failed(label, exc) from None
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(pfd)
    return SyncQMP(sock, label, max_line, timeout)


def connect_sync(
    path: str | os.PathLike[str],
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_line: int = MAX_LINE,
) -> SyncQMP:
    """As :func:`vmtransport.qmp.connect` for a socket's path, blocking: connected,
    greeted and negotiated within ``timeout`` seconds, or QMPConnectionError."""
    client = open_sync(path, timeout=timeout, max_line=max_line)
    try:
        client.negotiate()
    except BaseException:
        client.close()
        raise
    return client
