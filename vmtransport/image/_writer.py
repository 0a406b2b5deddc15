"""Save: the sinks that validate a QEMU stream on its way to a transport's sink, and
write it as a vmtransport image where the target can be rewritten.

* :class:`StreamWriter` validates the stream as it passes (a tap of the sans-io parser).
* :class:`ImageWriter` also writes the image header around it and checksums it.

Both are sinks wrapped around another sink, so they work the same from either pump
(threads, or trio) and see exactly the bytes that move.
"""

from __future__ import annotations

from typing import Any, final

from .._buffers import BlockingReader, Checksum, aligned_buffer, new_hasher
from .._errors import StreamError, TransportError
from .._transport import SeekableSink, Sink, Transport
from ..stream import StreamParser
from ._header import HEADER_SIZE, STATE_COMPLETE, STATE_PARTIAL, ImageHeader

#: the longest setup (see StreamParser.setup_end) an image checksums on its own
SETUP_MAX = 1 << 20


def stream_metadata(parser: StreamParser, setup: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a complete stream says about the VM: for the header and ``inspect``."""
    blocks = parser.ram_blocks
    cfg = parser.configuration
    meta: dict[str, Any] = {
        "machine_type": cfg.machine_type if cfg else None,
        "runstate": parser.runstate,
        "ram_total_bytes": sum(b.used_length for b in blocks.values()),
        "ram_blocks": [{"name": n, "used_length": b.used_length} for n, b in blocks.items()],
        "vm_description": parser.description is not None,
    }
    if setup is not None:
        meta["setup"] = setup
    return meta


class StreamWriter(Sink):
    """Save: validate the QEMU stream as it passes on to ``inner``.

    Data that is not a QEMU stream fails at the first write; a stream that stops before
    QEMU's EOF (and VM description) fails at commit, which then aborts ``inner``: no
    complete-looking image is ever left.
    """

    def __init__(self, inner: Sink, label: str) -> None:
        self._inner = inner
        self.label = label
        self.parser = StreamParser()
        self.length = 0

    def _check(self, data: memoryview) -> None:
        try:
            self.parser.feed(data)
        except StreamError as exc:
            raise StreamError(f"{self.label}: {exc}") from None
        self.length += len(data)

    def write(self, data: memoryview) -> None:
        self._check(data)
        self._inner.write(data)

    def enable_write_behind(self) -> int:
        return self._inner.enable_write_behind()  # data passes on as it came

    def _close_parser(self) -> None:
        try:
            self.parser.close()
        except StreamError as exc:
            raise StreamError(f"{self.label}: incomplete migration stream: {exc}") from None

    def commit(self) -> None:
        self._close_parser()
        self._inner.commit()

    def abort(self) -> None:
        self._inner.abort()

    def cancel(self) -> None:
        self._inner.cancel()


@final
class ImageWriter(StreamWriter):
    """Save into a vmtransport image on a seekable sink: header, stream, checksum."""

    def __init__(self, inner: SeekableSink, label: str, metadata: dict[str, Any]) -> None:
        super().__init__(inner, label)
        self._seekable = inner
        self.metadata = metadata  #: the caller's part; may change until commit
        self._checksum = Checksum()
        self._hashes = True  # write() updates the checksum (see use_checksum)
        # The setup's own checksum: a restore proves it before QEMU gets a byte, since
        # QEMU refuses a damaged setup (and ends the helper) before the image's end
        # could be read to name the cause.
        self._prefix: bytearray | None = bytearray()
        self._setup: dict[str, Any] | None = None
        # The "partial" header goes out with the first write, from the thread that
        # writes the stream: a sink is driven from one thread.
        self._headed = False

    def _put_header(self, header: ImageHeader, *, first: bool = False) -> None:
        # No explicit release/close: if the write fails (or a signal's exception lands in
        # it), its traceback still holds slices of the view, and releasing would raise
        # BufferError in place of the real error. The mapping goes with the last view.
        buf = aligned_buffer(HEADER_SIZE)
        buf[:] = header.encode()
        if first:
            self._inner.write(memoryview(buf))
        else:
            self._seekable.rewrite(0, memoryview(buf))

    def use_checksum(self, checksum: Checksum) -> None:
        """Take the stream's checksum from whoever reads it (a BlockingReader hashing
        as it reads) instead of computing it in :meth:`write`."""
        if self.length:
            raise ValueError("ImageWriter: a checksum must cover the stream from its start")
        self._checksum, self._hashes = checksum, False

    def _keep_setup(self, data: memoryview) -> None:
        prefix = self._prefix
        assert prefix is not None
        prefix += data[: SETUP_MAX - len(prefix)]
        end = self.parser.setup_end
        if end is not None and end <= len(prefix):
            digest = new_hasher()
            digest.update(prefix[:end])
            self._setup = {"length": end, "xxh3_128": digest.hexdigest()}
        if end is not None or len(prefix) >= SETUP_MAX:
            self._prefix = None

    def write(self, data: memoryview) -> None:
        self._check(data)
        if self._prefix is not None:
            self._keep_setup(data)
        if self._hashes:
            self._checksum.update(data)
        if not self._headed:
            self._put_header(ImageHeader(STATE_PARTIAL, 0, b"", 0, {}), first=True)
            self._headed = True
        self._inner.write(data)

    def commit(self) -> None:
        self._close_parser()
        eof = self.parser.eof_offset
        assert eof is not None
        meta = dict(self.metadata)
        meta["stream"] = stream_metadata(self.parser, self._setup)
        if self._checksum.length != self.length:  # a reader's: it must cover what we wrote
            raise TransportError(
                f"{self.label}: the checksum covers {self._checksum.length} bytes, "
                f"the stream has {self.length}"
            )
        header = ImageHeader(STATE_COMPLETE, self.length, self._checksum.digest(), eof, meta)
        self._put_header(header)
        self._inner.commit()


def save_sink(transport: Transport, name: str | None) -> StreamWriter:
    """The transport's sink behind the stream validator: an image where it can be."""
    sink = transport.open_sink()
    label = str(transport.uri)
    if transport.save_format == "image" and isinstance(sink, SeekableSink) and sink.rewritable:
        return ImageWriter(sink, label, save_metadata(name))
    return StreamWriter(sink, label)


def hash_as_read(reader: BlockingReader, sink: Sink) -> None:
    """Give ``sink`` the checksum ``reader`` computes as it reads (see BlockingReader) if
    it writes an image; otherwise nobody needs one, and the reader stops computing it."""
    if reader.checksum is None:
        return
    if isinstance(sink, ImageWriter):
        sink.use_checksum(reader.checksum)
    else:
        reader.checksum = None


def save_metadata(name: str | None) -> dict[str, Any]:
    import time

    from .._version import __version__

    return {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vmtransport_version": __version__,
    }
