"""The built-in plugin: registers the built-in transports through the public hook."""

from __future__ import annotations

from collections.abc import Sequence

from .._hookspecs import hookimpl
from .._transport import Transport
from . import ExecTransport, FdTransport, FileTransport, ODirectTransport


@hookimpl
def vmtransport_transports() -> Sequence[type[Transport]]:
    return [FileTransport, ODirectTransport, FdTransport, ExecTransport]
