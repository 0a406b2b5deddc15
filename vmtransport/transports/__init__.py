"""The built-in transports, registered through the same hook third-party plugins use."""

from __future__ import annotations

from collections.abc import Sequence

from .._hookspecs import hookimpl
from .._transport import Transport
from ._exec import ExecTransport
from ._fd import FdTransport
from ._file import FileTransport
from ._odirect import ODirectTransport

__all__ = ["ExecTransport", "FdTransport", "FileTransport", "ODirectTransport"]


@hookimpl
def vmtransport_transports() -> Sequence[type[Transport]]:
    return [FileTransport, ODirectTransport, FdTransport, ExecTransport]
