"""``zstd[,level=N][,threads=N]:INNER-URI``: zstd compression over any other transport.

``zstd:odirect:/var/lib/vm/a.sav`` saves what ``odirect:`` would, compressed: still a
vmtransport image (header, partial/complete state, checksum, metadata), so ``inspect``,
``verify`` and ``restore`` work through the wrapper unchanged. The layout is in this
package's README.

This module is imported by every ``vmtransport`` start (the registry's entry point):
``zstandard`` and the codec are imported only when a stream is opened.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import ClassVar, final

import vmtransport

__all__ = ["DEFAULT_LEVEL", "ZstdTransport", "vmtransport_transports"]

#: zstd's own default (``zstd -c``, libvirt's ``zstd`` format)
DEFAULT_LEVEL = 3
#: zstd's range of ordinary levels (negative "fast" levels are not offered)
MAX_LEVEL = 22


def _default_threads() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


@final
class ZstdTransport(vmtransport.WrappingTransport):
    scheme = "zstd"
    summary = "zstd compression over another transport (zstd,level=3:odirect:/x.sav)"
    options: ClassVar[Mapping[str, str]] = {
        "level": f"compression level 1-{MAX_LEVEL} (default {DEFAULT_LEVEL})",
        "threads": "compression threads (default: the CPUs this process may use, at most "
        "8; 0 compresses in the writer thread)",
    }

    def __init__(self, uri: vmtransport.URI) -> None:
        super().__init__(uri)
        self.level = self.int_option("level", DEFAULT_LEVEL)
        if not 1 <= self.level <= MAX_LEVEL:
            raise vmtransport.URIError(
                f"option level={uri.options['level']!r} in URI {str(uri)!r}: expected 1 to "
                f"{MAX_LEVEL}"
            )
        self.threads = self.int_option("threads", _default_threads())
        if self.threads > 256:
            raise vmtransport.URIError(
                f"option threads={uri.options['threads']!r} in URI {str(uri)!r}: at most 256"
            )

    def open_sink(self) -> vmtransport.Sink:
        from ._codec import ZstdSink, named

        try:
            inner = self.inner.open_sink()
        except vmtransport.VMTransportError as exc:
            raise named(str(self.uri), exc) from exc.__cause__
        try:
            return ZstdSink(inner, str(self.uri), self.level, self.threads)
        except BaseException:
            inner.abort()
            raise

    def open_threaded_source(self) -> vmtransport.ThreadedSource | None:
        from ._codec import ZstdThreadedSource, named

        try:
            inner = self.inner.open_threaded_source()
        except vmtransport.VMTransportError as exc:
            raise named(str(self.uri), exc) from exc.__cause__
        if inner is None:
            return None

        return ZstdThreadedSource(inner, str(self.uri))

    async def open_source(self) -> vmtransport.Source:
        from ._codec import ZstdSource, ZstdThreadedSource, named

        try:
            inner = await self.inner.open_source()
        except vmtransport.VMTransportError as exc:
            raise named(str(self.uri), exc) from exc.__cause__
        if isinstance(inner, vmtransport.ThreadedSource):
            return ZstdThreadedSource(inner, str(self.uri))
        return ZstdSource(inner, str(self.uri))


@vmtransport.hookimpl
def vmtransport_transports() -> Sequence[type[vmtransport.Transport]]:
    return [ZstdTransport]
