"""Helpers for testing code that handles QEMU migration streams (transports, sinks,
plugins): synthetic streams that vmtransport's own stream parser accepts as complete,
built whole (:class:`SyntheticStream`) or element by element (:class:`StreamWriter`),
with the offsets of their parts for corruption tests; and :func:`cached_bytes`, how
much of a file is in the page cache.

Not imported by ``vmtransport`` itself: ``import vmtransport.testing`` to use it.
"""

from __future__ import annotations

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
    "PAGE_SIZE",
    "Device",
    "PageRecord",
    "Section",
    "StreamLayout",
    "StreamWriter",
    "SyntheticStream",
    "cached_bytes",
]
