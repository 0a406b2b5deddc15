"""``fd:N`` (an inherited descriptor) and ``fd:NAME`` (systemd-style named descriptors).

Named descriptors follow sd_listen_fds(3): fds 3.. are passed, ``LISTEN_FDS`` counts
them, ``LISTEN_FDNAMES`` names them (colon-separated) and ``LISTEN_PID``, when set,
must be this process.
"""

from __future__ import annotations

import os
import re
from typing import final

from .._errors import TransportError, URIError
from .._io import FdSink, FileSource, fd_source, is_pollable
from .._transport import Sink, Source, ThreadedSource, Transport
from .._uri import URI

_LISTEN_FDS_START = 3
_FD_MAX = (1 << 31) - 1  # descriptors are C ints
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")


def named_fd(name: str, label: str) -> int:
    env = os.environ
    pid = env.get("LISTEN_PID")
    if pid is not None and pid != str(os.getpid()):
        raise TransportError(f"{label}: LISTEN_PID={pid} is not this process ({os.getpid()})")
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for i, n in enumerate(names[:count]):
        if n == name:
            return _LISTEN_FDS_START + i
    have = ", ".join(names[:count]) or "none"
    raise TransportError(
        f"{label}: no descriptor named {name!r} was passed (LISTEN_FDNAMES: {have})"
    )


@final
class FdTransport(Transport):
    scheme = "fd"
    summary = "an inherited file descriptor: fd:N, or fd:NAME passed via LISTEN_FDNAMES"

    def __init__(self, uri: URI) -> None:
        super().__init__(uri)
        t = uri.target
        # (isdigit() alone takes "²", which int() refuses)
        if not ((t.isascii() and t.isdigit()) or _NAME.match(t)):
            raise URIError(f"bad target in URI {str(uri)!r}: expected a number or a name")
        if t.isascii() and t.isdigit() and int(t) > _FD_MAX:
            raise URIError(f"bad target in URI {str(uri)!r}: no descriptor has that number")

    def _fd(self) -> int:
        label = str(self.uri)
        t = self.uri.target
        fd = int(t) if t.isascii() and t.isdigit() else named_fd(t, label)
        try:
            os.fstat(fd)
        except OSError as exc:
            raise TransportError(f"{label}: descriptor {fd} is not open") from exc
        return fd

    def open_sink(self) -> Sink:
        return FdSink(self._fd(), str(self.uri), confirm=True)

    async def open_source(self) -> Source:
        return fd_source(self._fd(), str(self.uri))

    def open_threaded_source(self) -> ThreadedSource | None:
        fd = self._fd()
        return None if is_pollable(fd) else FileSource(fd, str(self.uri))
