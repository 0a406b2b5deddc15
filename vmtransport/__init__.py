"""vmtransport: pluggable migration transports for QEMU.

The public API, most important first. Everything else lives in private modules.
"""

from __future__ import annotations

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
from ._version import __version__

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
