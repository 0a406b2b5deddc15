"""The built-in transports. ``_builtin`` registers them through the same hook
third-party plugins use; this package itself does not import pluggy, and loads each
transport on first use (PEP 562), so the restore helper can open a file before the
registry is loaded (see ``vmtransport._main``) without importing ``exec:``'s
subprocess and signal machinery first."""

from __future__ import annotations

from .. import _load

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._exec import ExecTransport
    from ._fd import FdTransport
    from ._file import FileTransport
    from ._odirect import ODirectTransport

__all__ = ["ExecTransport", "FdTransport", "FileTransport", "ODirectTransport"]

_EXPORTS: dict[str, tuple[str, str]] = {
    "ExecTransport": ("._exec", "ExecTransport"),
    "FdTransport": ("._fd", "FdTransport"),
    "FileTransport": ("._file", "FileTransport"),
    "ODirectTransport": ("._odirect", "ODirectTransport"),
}


def __getattr__(name: str) -> object:
    return _load(globals(), _EXPORTS, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
