"""vmtransport: pluggable migration transports for QEMU.

The public API, most important first. Everything else lives in private modules.
"""

from __future__ import annotations

import logging

from ._copy import copy, open_sink, open_source, restore, save
from ._errors import (
    CommandError,
    PluginError,
    StreamError,
    TransportError,
    URIError,
    UsageError,
    VMTransportError,
)
from ._hookspecs import hookimpl
from ._pump import PumpStats, pump
from ._registry import Registry, TransportInfo, get_registry
from ._transport import Sink, Source, Transport
from ._uri import URI, parse_uri

__version__ = "0.1.0"

__all__ = [
    "URI",
    "CommandError",
    "PluginError",
    "PumpStats",
    "Registry",
    "Sink",
    "Source",
    "StreamError",
    "Transport",
    "TransportError",
    "TransportInfo",
    "URIError",
    "UsageError",
    "VMTransportError",
    "copy",
    "get_registry",
    "hookimpl",
    "open_sink",
    "open_source",
    "parse_uri",
    "pump",
    "restore",
    "save",
]

logging.getLogger("vmtransport").addHandler(logging.NullHandler())
