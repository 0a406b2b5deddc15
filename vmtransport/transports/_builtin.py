"""The built-in plugin: registers the built-in transports through the public hook."""

from __future__ import annotations

from collections.abc import Sequence

from .._hookspecs import hookimpl
from .._transport import Transport
from ._exec import ExecTransport
from ._fd import FdTransport
from ._file import FileTransport
from ._odirect import ODirectTransport


@hookimpl
def vmtransport_transports() -> Sequence[type[Transport]]:
    return [FileTransport, ODirectTransport, FdTransport, ExecTransport]
