"""The built-in transports. ``_builtin`` registers them through the same hook
third-party plugins use; this package itself does not import pluggy, and loads each
transport on first use (PEP 562), so the restore helper can open a file before the
registry is loaded (see ``vmtransport._main``) without importing ``exec:``'s
subprocess and signal machinery first."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._exec import ExecTransport
    from ._fd import FdTransport
    from ._file import FileTransport
    from ._odirect import ODirectTransport

__all__ = ["ExecTransport", "FdTransport", "FileTransport", "ODirectTransport"]

_MODULES = {
    "ExecTransport": "._exec",
    "FdTransport": "._fd",
    "FileTransport": "._file",
    "ODirectTransport": "._odirect",
}


def __getattr__(name: str) -> object:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_MODULES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
