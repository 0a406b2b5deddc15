"""Helpers for testing code that handles QEMU migration streams (transports, sinks,
plugins): synthetic streams that vmtransport's own stream parser accepts as complete,
built whole (:class:`SyntheticStream`) or element by element (:class:`StreamWriter`),
with the offsets of their parts for corruption tests.

Not imported by ``vmtransport`` itself: ``import vmtransport.testing`` to use it.
"""

from __future__ import annotations

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
]
