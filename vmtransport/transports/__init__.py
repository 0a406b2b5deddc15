"""The built-in transports. ``_builtin`` registers them through the same hook
third-party plugins use; this package itself does not import pluggy, so the restore
helper can open a file before the registry is loaded (see ``vmtransport._main``)."""

from __future__ import annotations

from ._exec import ExecTransport
from ._fd import FdTransport
from ._file import FileTransport
from ._odirect import ODirectTransport

__all__ = ["ExecTransport", "FdTransport", "FileTransport", "ODirectTransport"]
