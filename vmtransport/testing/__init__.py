"""Helpers for testing and measuring code that moves QEMU migration streams."""

from __future__ import annotations

from ._pagecache import cached_bytes

__all__ = ["cached_bytes"]
