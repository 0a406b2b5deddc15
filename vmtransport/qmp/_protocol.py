"""QMP without I/O: framing, message shapes and command ids (sans-io, as h11 does HTTP).

:class:`Protocol` is fed the bytes the monitor sent and hands back :class:`Greeting`,
:class:`Reply` and :class:`Event` values; it encodes commands and remembers which ids
are outstanding. Anything that is not QMP raises :class:`ProtocolViolation`, which the
client turns into :class:`~vmtransport.QMPConnectionError` (the connection is then of no
further use: after garbage, where the next message starts is a guess).

The wire format (QEMU's ``docs/interop/qmp-spec.rst``): one JSON object per line, both
ways. The server speaks first (``{"QMP": {...}}``); replies are ``{"return": X, "id": I}``
or ``{"error": {"class": C, "desc": D}, "id": I}`` and echo the command's ``id``; events
are ``{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": U}}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, final

#: The longest line accepted from a monitor. QEMU's largest replies (``query-qmp-schema``
#: is about 200 KB on 10.0) are far below it; a line that long is a peer gone wrong, and
#: buffering more would only let it take memory.
MAX_LINE: Final = 16 << 20
#: Seconds a command waits for its reply unless told otherwise. QEMU answers in
#: milliseconds; only a stalled main loop (or a monitor that is not QEMU's) takes longer.
DEFAULT_TIMEOUT: Final = 30.0
#: Seconds connecting may take: connect, be greeted and negotiate.
DEFAULT_CONNECT_TIMEOUT: Final = 10.0


class ProtocolViolation(Exception):
    """The peer sent something that is not QMP; the message says what."""


@final
@dataclass(frozen=True)
class Greeting:
    """The server's first message."""

    version: tuple[int, int, int]  #: QEMU's (major, minor, micro); (0, 0, 0) if absent
    package: str  #: e.g. "Debian 1:7.2+dfsg-7+deb12u18"
    capabilities: tuple[str, ...]  #: what the server offers, e.g. ("oob",)


@final
@dataclass(frozen=True)
class Reply:
    """The answer to the command whose id is :attr:`id`: :attr:`value` on success,
    :attr:`error` = (class, desc) on failure."""

    id: int
    value: Any = None
    error: tuple[str, str] | None = None


@final
@dataclass(frozen=True)
class Event:
    """An asynchronous event, e.g. ``Event("STOP", {}, 1700000000.25)``."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0  #: QEMU's wall clock when it emitted the event


Message = Greeting | Reply | Event


def _shape(msg: object) -> str:
    text = repr(msg)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_line(line: bytes) -> dict[str, Any]:
    """One line -> the JSON object it holds."""
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolViolation(f"sent a line that is not JSON ({exc})") from None
    if not isinstance(msg, dict):
        raise ProtocolViolation(f"sent JSON that is not an object: {_shape(msg)}")
    return msg


def _greeting(msg: dict[str, Any]) -> Greeting:
    body = msg.get("QMP")
    if not isinstance(body, dict):
        raise ProtocolViolation(f"did not greet with a QMP banner but sent {_shape(msg)}")
    version: tuple[int, int, int] = (0, 0, 0)
    package = ""
    info = body.get("version")
    if isinstance(info, dict):
        qemu = info.get("qemu")
        if isinstance(qemu, dict):
            parts = [qemu.get(k) for k in ("major", "minor", "micro")]
            if all(isinstance(p, int) for p in parts):
                version = (int(parts[0] or 0), int(parts[1] or 0), int(parts[2] or 0))
        if isinstance(info.get("package"), str):
            package = info["package"].strip()
    caps = body.get("capabilities", [])
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise ProtocolViolation(f"sent a greeting with bad capabilities: {_shape(caps)}")
    return Greeting(version, package, tuple(caps))


def _event(msg: dict[str, Any]) -> Event:
    name = msg["event"]
    data = msg.get("data", {})
    if not isinstance(name, str) or not isinstance(data, dict):
        raise ProtocolViolation(f"sent a malformed event: {_shape(msg)}")
    stamp = msg.get("timestamp")
    when = 0.0
    if isinstance(stamp, dict):
        seconds, micros = stamp.get("seconds"), stamp.get("microseconds")
        if isinstance(seconds, int) and isinstance(micros, int):
            when = seconds + micros / 1e6
    return Event(name, data, when)


def _reply(msg: dict[str, Any]) -> Reply:
    cmd_id = msg.get("id")
    if "error" in msg:
        err = msg["error"]
        if not isinstance(err, dict):
            raise ProtocolViolation(f"sent a malformed error reply: {_shape(msg)}")
        cls, desc = err.get("class"), err.get("desc")
        if not isinstance(cls, str) or not isinstance(desc, str):
            raise ProtocolViolation(f"sent a malformed error reply: {_shape(msg)}")
        if not isinstance(cmd_id, int):
            # We always send valid commands with ids: an id-less error means QEMU could
            # not read what we sent, and which command failed is unknown.
            raise ProtocolViolation(f"sent an error for no command of ours: {cls}: {desc}")
        return Reply(cmd_id, error=(cls, desc))
    if not isinstance(cmd_id, int):
        raise ProtocolViolation(f"sent a reply without a command id: {_shape(msg)}")
    return Reply(cmd_id, value=msg["return"])


@final
class Protocol:
    """The QMP state of one connection: call :meth:`feed` with received bytes and
    :meth:`eof` at end-of-file, take messages with :meth:`next_message`, encode commands
    with :meth:`command`."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be positive, not {max_line}")
        self.max_line = max_line
        self.greeted = False
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline
        self._next_id = 0
        self._outstanding: set[int] = set()
        self._abandoned: set[int] = set()

    # -- receiving
    def feed(self, data: bytes) -> None:
        self._buf += data

    def eof(self) -> None:
        """The peer closed its end: always a violation, as QMP has no goodbye."""
        if self._buf.strip():
            raise ProtocolViolation(
                f"closed the connection in the middle of a message ({len(self._buf)} bytes)"
            )
        if not self.greeted:
            raise ProtocolViolation("closed the connection without a greeting")
        raise ProtocolViolation("closed the connection")

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes arrive. Replies to
        abandoned commands (timed out, cancelled) are skipped."""
        while True:
            end = self._buf.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(self._buf)
                if self._scanned > self.max_line:
                    raise ProtocolViolation(
                        f"sent a line longer than {self.max_line} bytes without its end"
                    )
                return None
            if end > self.max_line:
                raise ProtocolViolation(f"sent a line longer than {self.max_line} bytes")
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            self._scanned = 0
            if not line.strip():
                continue  # blank lines carry nothing; QEMU sends none, be lenient
            msg = self._classify(parse_line(line))
            if msg is not None:
                return msg

    def _classify(self, msg: dict[str, Any]) -> Message | None:
        if not self.greeted:
            greeting = _greeting(msg)
            self.greeted = True
            return greeting
        if "event" in msg:
            return _event(msg)
        if "return" in msg or "error" in msg:
            reply = _reply(msg)
            if reply.id in self._outstanding:
                self._outstanding.discard(reply.id)
                return reply
            if reply.id in self._abandoned:
                self._abandoned.discard(reply.id)
                return None  # its caller gave up waiting; nobody wants it
            raise ProtocolViolation(f"sent a reply to command id {reply.id}, never sent")
        raise ProtocolViolation(f"sent a message that is neither reply nor event: {_shape(msg)}")

    # -- sending
    def command(self, name: str, arguments: Mapping[str, Any] | None = None) -> tuple[int, bytes]:
        """Encode command ``name`` with a fresh id; returns (id, the line to send)."""
        if not self.greeted:
            raise RuntimeError("QMP commands before the greeting")
        self._next_id += 1
        payload: dict[str, Any] = {"execute": name, "id": self._next_id}
        if arguments:
            payload["arguments"] = dict(arguments)
        line = json.dumps(payload, separators=(",", ":")).encode() + b"\n"
        self._outstanding.add(self._next_id)
        return self._next_id, line

    def abandon(self, cmd_id: int) -> None:
        """Nobody waits for ``cmd_id`` any more: drop its reply when it comes."""
        if cmd_id in self._outstanding:
            self._outstanding.discard(cmd_id)
            self._abandoned.add(cmd_id)
