"""Helpers for testing code that handles QEMU migration streams (transports, sinks,
plugins): synthetic streams that vmtransport's own stream parser accepts as complete,
built whole (:class:`SyntheticStream`) or element by element (:class:`StreamWriter`),
with the offsets of their parts for corruption tests; :func:`cached_bytes`, how
much of a file is in the page cache; and the transport conformance suite
(:func:`check_transport`, :func:`run_check`, :class:`TransportFactory`), which every
transport, built-in or plugin, must pass (docs/plugins.md).

Not imported by ``vmtransport`` itself: ``import vmtransport.testing`` to use it.
"""

from __future__ import annotations

from ._conformance import (
    BACKPRESSURE_MAX,
    BACKPRESSURE_MIN,
    CHECKS,
    DEFAULT_SIZE,
    LOOP_LATENESS,
    MEMORY_BOUND,
    STALL,
    Channel,
    ConformanceFailure,
    Feed,
    NotApplicable,
    PathFactory,
    Pattern,
    Report,
    TransportFactory,
    Workspace,
    check_transport,
    fifo_feed,
    run_check,
)
from ._pagecache import cached_bytes
from ._streams import (
    PAGE_SIZE,
    Device,
    PageRecord,
    Section,
    StreamLayout,
    StreamWriter,
    SyntheticStream,
)

__all__ = [
    "BACKPRESSURE_MAX",
    "BACKPRESSURE_MIN",
    "CHECKS",
    "DEFAULT_SIZE",
    "LOOP_LATENESS",
    "MEMORY_BOUND",
    "PAGE_SIZE",
    "STALL",
    "Channel",
    "ConformanceFailure",
    "Device",
    "Feed",
    "NotApplicable",
    "PageRecord",
    "PathFactory",
    "Pattern",
    "Report",
    "Section",
    "StreamLayout",
    "StreamWriter",
    "SyntheticStream",
    "TransportFactory",
    "Workspace",
    "cached_bytes",
    "check_transport",
    "fifo_feed",
    "run_check",
]
