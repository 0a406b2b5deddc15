"""The trio QMP client: connect, execute, listen for events, pass descriptors.

No background task: whoever waits reads. A task waiting for its reply (or a listener
waiting for an event) reads the socket while no other task does, and dispatches every
message it reads: replies to the commands they answer, events to the listeners that
want them. So the client needs no nursery, an exception never comes out of a task the
caller did not start, and cancelling any waiter loses nothing (trio's ``recv`` either
returns bytes or is cancelled before taking any; partial lines stay in the protocol).

Events are read while somebody waits on the client. Between waits they stay in the
socket and QEMU's output buffer. Each listener keeps at most ``buffer`` events; when
it is full the oldest is dropped and :attr:`EventListener.dropped` counts it (the reader
must never block on a slow listener, or replies would stall behind it).
"""

from __future__ import annotations

import array
import math
import os
import socket as _socket
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self, final

import trio

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
from ._sync import DOING, RECV_BYTES, SyncQMP, connect_failed, open_path

#: Events a listener keeps before dropping the oldest.
DEFAULT_EVENT_BUFFER: Final = 1024

_AF_UNIX: Final = _socket.AF_UNIX


@final
class EventListener:
    """Events of the chosen names, oldest first; from :meth:`QMPClient.listen`.

    Iterate (``async for event in listener``) or :meth:`receive`. Both raise
    :class:`~vmtransport.QMPConnectionError` once the queued events are delivered and
    the connection is broken; iteration stops when the client or the listener is closed.
    """

    def __init__(self, client: QMPClient, names: frozenset[str] | None, buffer: int) -> None:
        if buffer < 1:
            raise ValueError(f"an event buffer must hold at least 1 event, not {buffer}")
        self._client = client
        self.names = names  #: the event names delivered; None means all
        self._queue: deque[Event] = deque(maxlen=buffer)
        self.dropped = 0  #: events lost because the buffer was full
        self.closed = False

    def _put(self, event: Event) -> None:
        if self.names is not None and event.name not in self.names:
            return
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1  # deque(maxlen) drops the oldest on append
        self._queue.append(event)

    async def receive(self) -> Event:
        """The next event; waits (reading the socket if nobody else does). Raises
        ``trio.EndOfChannel`` once the listener or its client is closed."""
        await self._client._wait(lambda: bool(self._queue) or self.closed, for_event=True)
        if self._queue:
            return self._queue.popleft()
        raise trio.EndOfChannel

    def get_nowait(self) -> Event | None:
        """The oldest event already received, or None; reads nothing."""
        return self._queue.popleft() if self._queue else None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop collecting; queued events are discarded."""
        self.closed = True
        self._queue.clear()
        self._client._listeners.discard(self)
        self._client._wake()  # a task in receive() ends

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@final
class FdsetFd:
    """What ``add-fd`` answered: the fd set and QEMU's number for the descriptor in it."""

    __slots__ = ("fd", "fdset_id")

    def __init__(self, fdset_id: int, fd: int) -> None:
        self.fdset_id = fdset_id
        self.fd = fd

    @property
    def path(self) -> str:
        """The name QEMU opens it by (``/dev/fdset/N``), e.g. in a ``file:`` URI."""
        return f"/dev/fdset/{self.fdset_id}"

    def __repr__(self) -> str:
        return f"FdsetFd(fdset_id={self.fdset_id}, fd={self.fd})"


@final
class QMPClient:
    """One QMP connection; get one from :func:`connect`. Safe to share between the
    tasks of one trio run: commands may run concurrently, each matched to its reply by
    id. Close with :meth:`aclose` or ``async with``."""

    def __init__(self, sock: trio.socket.SocketType, monitor: str, max_line: int) -> None:
        self.monitor = monitor  #: how messages name the monitor (its path)
        self.greeting: Greeting | None = None  #: set by :func:`connect`
        self._sock = sock
        self._protocol = Protocol(max_line)
        self._replies: dict[int, Reply] = {}
        self._listeners: set[EventListener] = set()
        self._error: str | None = None  # why the connection is unusable
        self._closed = False
        self._reading = False
        self._progress = trio.Event()  # set (and replaced) after each read
        self._send_lock = trio.Lock()
        # QEMU takes a command's descriptors from the last message that brought any: two
        # commands with descriptors in flight at once could swap them.
        self._fd_lock = trio.Lock()
        self._backlog: deque[Event] = deque()  # read by a previous owner (adopt)

    @classmethod
    def adopt(cls, connection: SyncQMP) -> QMPClient:
        """Take over a connection the blocking client (``_sync``) opened and negotiated:
        its socket, its protocol's state (command ids, bytes read but not yet parsed)
        and the events it read that nobody took. Those events are dispatched first, as
        if they were still unread in the socket (see the module's docstring); a broken
        connection stays broken, for the same reason."""
        broken = connection.error
        greeting = connection.greeting
        raw = connection.detach()  # a _socket.socket: trio wants a socket.socket
        sock = _socket.socket(fileno=raw.detach())
        client = cls(trio.socket.from_stdlib_socket(sock), connection.monitor, MAX_LINE)
        client._protocol = connection.protocol
        client.greeting = greeting
        client._backlog.extend(connection.events)
        connection.events.clear()
        if broken is not None:
            client._fail(broken)
        return client

    # -- public interface
    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` ran or the connection broke."""
        return self._closed or self._error is not None

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        fds: Sequence[int] = (),
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Any:
        """Run ``command`` and return its ``return`` value.

        ``fds`` travel with the command as SCM_RIGHTS (for ``getfd``, ``add-fd``); the
        caller keeps its own copies. ``timeout`` (seconds; None: only the caller's cancel
        scopes) bounds the whole exchange. Raises :class:`~vmtransport.QMPError` when
        QEMU refuses the command, :class:`~vmtransport.QMPConnectionError` when the
        connection is or becomes unusable or no reply comes in time. A command that
        timed out or was cancelled may still have run: its late reply is dropped.
        """
        if fds and self._sock.family != _AF_UNIX:
            raise ValueError(f"{command}: descriptors can only pass over a UNIX socket")
        with trio.move_on_after(math.inf if timeout is None else timeout):
            if fds:
                async with self._fd_lock:
                    reply = await self._exchange(command, arguments, fds)
            else:
                reply = await self._exchange(command, arguments, fds)
            if reply.error is not None:
                raise QMPError(self.monitor, command, *reply.error)
            return reply.value
        raise QMPConnectionError(
            f"QMP monitor {self.monitor}: no reply to {command} within {timeout:g} s"
        )

    def listen(self, *names: str, buffer: int = DEFAULT_EVENT_BUFFER) -> EventListener:
        """Start collecting events named ``names`` (all events if none); use as a
        context manager, entered *before* the command that causes the events."""
        self._check_usable()
        listener = EventListener(self, frozenset(names) if names else None, buffer)
        self._listeners.add(listener)
        return listener

    async def getfd(self, fd: int, fdname: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Give QEMU a duplicate of ``fd`` under ``fdname`` (e.g. for ``migrate
        fd:NAME``). QEMU replaces a descriptor of the same name; :meth:`closefd` frees it."""
        await self.execute("getfd", {"fdname": fdname}, fds=[fd], timeout=timeout)

    async def closefd(self, fdname: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        await self.execute("closefd", {"fdname": fdname}, timeout=timeout)

    async def add_fd(
        self,
        fd: int,
        *,
        fdset_id: int | None = None,
        opaque: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> FdsetFd:
        """Add a duplicate of ``fd`` to fd set ``fdset_id`` (a new set if None)."""
        args: dict[str, Any] = {}
        if fdset_id is not None:
            args["fdset-id"] = fdset_id
        if opaque is not None:
            args["opaque"] = opaque
        value = await self.execute("add-fd", args, fds=[fd], timeout=timeout)
        try:
            return FdsetFd(int(value["fdset-id"]), int(value["fd"]))
        except (TypeError, KeyError, ValueError):
            raise QMPConnectionError(
                f"QMP monitor {self.monitor}: add-fd answered {value!r}"
            ) from None

    async def remove_fd(
        self, fdset_id: int, fd: int | None = None, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        """Remove QEMU's descriptor ``fd`` (all of the set if None) from ``fdset_id``;
        QEMU closes it once nothing it runs uses it."""
        args: dict[str, Any] = {"fdset-id": fdset_id}
        if fd is not None:
            args["fd"] = fd
        await self.execute("remove-fd", args, timeout=timeout)

    async def aclose(self) -> None:
        """Close the connection. Pending commands raise QMPConnectionError, listeners
        end. QEMU keeps running (QMP closing is not ``quit``)."""
        if self._closed:
            return
        self._closed = True
        if self._error is None:
            self._error = "connection closed"
        for listener in list(self._listeners):
            listener.closed = True
        self._sock.close()  # wakes a task in recv with ClosedResourceError
        self._wake()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- session machinery
    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._broken()

    def _broken(self) -> QMPConnectionError:
        # A new exception for every waiter: one instance raised in several tasks would
        # pile up their tracebacks.
        return QMPConnectionError(f"QMP monitor {self.monitor}: {self._error}")

    def _fail(self, reason: str) -> QMPConnectionError:
        """Break the connection for good: every waiter raises the first reason."""
        if self._error is None:
            self._error = reason
            self._wake()
        return self._broken()

    def _wake(self) -> None:
        progress, self._progress = self._progress, trio.Event()
        progress.set()

    async def _exchange(
        self, command: str, arguments: Mapping[str, Any] | None, fds: Sequence[int]
    ) -> Reply:
        self._check_usable()
        cmd_id, line = self._protocol.command(command, arguments)
        answered = False
        try:
            async with self._send_lock:
                await self._send(command, line, fds)
            await self._wait(lambda: cmd_id in self._replies)
            answered = True
            return self._replies.pop(cmd_id)
        finally:
            if not answered:
                self._replies.pop(cmd_id, None)
                self._protocol.abandon(cmd_id)

    async def _send(self, command: str, line: bytes, fds: Sequence[int]) -> None:
        self._check_usable()
        data = memoryview(line)
        try:
            if fds:
                # The descriptors ride on the first bytes of the command's own line.
                ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))]
                data = data[await self._sock.sendmsg([data], ancillary) :]
            while data:
                data = data[await self._sock.send(data) :]
        except OSError as exc:
            raise self._fail(f"sending {command}: {exc.strerror or exc}") from None
        except trio.ClosedResourceError:
            raise self._fail("connection closed") from None
        finally:
            if 0 < len(data) < len(line):
                # Cancelled half way: the monitor now holds half a command.
                self._fail(f"{command} was cut off while being sent")

    async def _wait(self, done: Callable[[], bool], *, for_event: bool = False) -> None:
        """Read and dispatch messages until ``done()``; raise if the connection breaks
        first (queued events are delivered before that, see EventListener)."""
        while not done():
            if self._error is not None:
                if for_event and self._closed:
                    return  # the caller's done() turns a closed client into an end
                raise self._broken()
            if self._reading:
                await self._progress.wait()
                continue
            self._reading = True
            try:
                await self._read_one()
            finally:
                self._reading = False
                self._wake()

    async def _read_one(self) -> None:
        """Read until one message is complete and dispatch it (or break the connection)."""
        if self._backlog:
            event = self._backlog.popleft()
            for listener in list(self._listeners):
                listener._put(event)
            return
        try:
            while True:
                msg = self._protocol.next_message()
                if msg is not None:
                    break
                data = await self._sock.recv(RECV_BYTES)
                if not data:
                    self._protocol.eof()  # always raises
                self._protocol.feed(data)
        except ProtocolViolation as exc:
            self._fail(str(exc))
            return
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "closed"
            self._fail(f"reading: {reason}")
            return
        if isinstance(msg, Reply):
            self._replies[msg.id] = msg
        elif isinstance(msg, Event):
            for listener in list(self._listeners):
                listener._put(msg)
        else:
            self.greeting = msg


async def _open_path(path: str) -> trio.socket.SocketType:
    """Connect to the UNIX socket at ``path``, whatever its length (see ``open_path``)."""
    pfd, address = open_path(path)
    try:
        sock = trio.socket.socket(_AF_UNIX, _socket.SOCK_STREAM)
        try:
            await sock.connect(address)
        except OSError as exc:
            sock.close()
            raise connect_failed(path, exc) from None
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(pfd)


async def connect(
    monitor: str | os.PathLike[str] | _socket.socket | trio.socket.SocketType,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    name: str | None = None,
    max_line: int = MAX_LINE,
) -> QMPClient:
    """Connect to a QMP monitor, read its greeting and negotiate capabilities.

    ``monitor`` is the path of QEMU's QMP socket (``-qmp unix:PATH,server=on``) or an
    already connected stream socket, which the client then owns and closes. ``name``
    names the monitor in messages (default: the path, or the socket's peer). The whole
    handshake has ``timeout`` seconds: a file that is not a socket, a socket nobody
    listens on, a peer that never greets (another client holds QEMU's monitor: QEMU
    serves one at a time) or one that greets with something else raise
    :class:`~vmtransport.QMPConnectionError` naming the monitor.
    """
    label = name
    if isinstance(monitor, str | os.PathLike):
        label = label or os.fspath(monitor)
    elif label is None:
        try:
            peer = monitor.getpeername()
        except OSError:
            peer = ""
        label = peer if isinstance(peer, str) and peer else f"socket fd {monitor.fileno()}"
    stage = "connect"
    client: QMPClient | None = None
    sock: trio.socket.SocketType | None = None
    with trio.move_on_after(timeout):
        try:
            if isinstance(monitor, str | os.PathLike):
                sock = await _open_path(os.fspath(monitor))
            elif isinstance(monitor, _socket.socket):
                sock = trio.socket.from_stdlib_socket(monitor)
            else:
                sock = monitor
            if sock.type != _socket.SOCK_STREAM:
                raise ValueError(f"QMP monitor {label}: not a stream socket")
            client = QMPClient(sock, label, max_line)
            stage = "greet"
            await client._wait(lambda: client is not None and client.greeting is not None)
            stage = "negotiate"
            # No capabilities asked for: without "oob" QEMU runs commands one at a time,
            # in the order sent, which is what descriptor passing relies on.
            await client.execute("qmp_capabilities", {}, timeout=None)
            return client
        except BaseException:
            if client is not None:
                client._closed = True
            if sock is not None:
                sock.close()
            raise
    raise QMPConnectionError(f"QMP monitor {label}: {DOING[stage]} within {timeout:g} s")
