"""vmtransport: pluggable migration transports for QEMU.

The public API, most important first. Everything else lives in private modules, which
load on first use (PEP 562): the ``vmtransport`` command starts reading a save's stream
before it imports them (see ``_main``).
"""

from __future__ import annotations

from ._version import __version__

TYPE_CHECKING = False  # not typing's: a helper's start-up counts (see ``_early``)
if TYPE_CHECKING:
    from typing import Any

    from ._copy import copy, open_sink, open_source, restore, restore_fd, save, save_fd
    from ._errors import (
        CommandError,
        Interrupted,
        PluginError,
        StreamError,
        TransportError,
        URIError,
        UsageError,
        VMTransportError,
    )
    from ._hookspecs import hookimpl
    from ._inspect import describe as inspect_image
    from ._inspect import verify as verify_image
    from ._pump import PumpStats, pump, pump_blocking
    from ._registry import Registry, TransportInfo, get_registry
    from ._transport import SeekableSink, Sink, Source, ThreadedSource, Transport
    from ._uri import URI, parse_uri

_EXPORTS: dict[str, tuple[str, str]] = {
    "copy": ("._copy", "copy"),
    "open_sink": ("._copy", "open_sink"),
    "open_source": ("._copy", "open_source"),
    "restore": ("._copy", "restore"),
    "restore_fd": ("._copy", "restore_fd"),
    "save": ("._copy", "save"),
    "save_fd": ("._copy", "save_fd"),
    "CommandError": ("._errors", "CommandError"),
    "Interrupted": ("._errors", "Interrupted"),
    "PluginError": ("._errors", "PluginError"),
    "StreamError": ("._errors", "StreamError"),
    "TransportError": ("._errors", "TransportError"),
    "URIError": ("._errors", "URIError"),
    "UsageError": ("._errors", "UsageError"),
    "VMTransportError": ("._errors", "VMTransportError"),
    "hookimpl": ("._hookspecs", "hookimpl"),
    "inspect_image": ("._inspect", "describe"),
    "verify_image": ("._inspect", "verify"),
    "PumpStats": ("._pump", "PumpStats"),
    "pump": ("._pump", "pump"),
    "pump_blocking": ("._pump", "pump_blocking"),
    "Registry": ("._registry", "Registry"),
    "TransportInfo": ("._registry", "TransportInfo"),
    "get_registry": ("._registry", "get_registry"),
    "SeekableSink": ("._transport", "SeekableSink"),
    "Sink": ("._transport", "Sink"),
    "Source": ("._transport", "Source"),
    "ThreadedSource": ("._transport", "ThreadedSource"),
    "Transport": ("._transport", "Transport"),
    "URI": ("._uri", "URI"),
    "parse_uri": ("._uri", "parse_uri"),
}

__all__ = [
    "URI",
    "CommandError",
    "Interrupted",
    "PluginError",
    "PumpStats",
    "Registry",
    "SeekableSink",
    "Sink",
    "Source",
    "StreamError",
    "ThreadedSource",
    "Transport",
    "TransportError",
    "TransportInfo",
    "URIError",
    "UsageError",
    "VMTransportError",
    "__version__",
    "copy",
    "get_registry",
    "hookimpl",
    "inspect_image",
    "open_sink",
    "open_source",
    "parse_uri",
    "pump",
    "pump_blocking",
    "restore",
    "restore_fd",
    "save",
    "save_fd",
    "verify_image",
]


def _load(namespace: dict[str, Any], exports: dict[str, tuple[str, str]], name: str) -> Any:
    """PEP 562 for this package and its subpackages: import the module ``exports`` names
    for ``name`` on first use, and keep the value in the package's ``namespace``."""
    package = namespace["__name__"]
    try:
        module, attr = exports[name]
    except KeyError:
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module, package), attr)
    namespace[name] = value
    return value


def __getattr__(name: str) -> Any:
    return _load(globals(), _EXPORTS, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
