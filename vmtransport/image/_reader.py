"""Restore: the sink that recognises what is coming and passes the bare QEMU stream on,
verified.

QEMU finishes a load, and resumes the VM, the moment it reads its EOF marker where a
section type belongs; a damaged byte anywhere before can put one there. So QEMU is
handed only what the stream parser has followed exactly as QEMU's loader reads it
(:attr:`StreamParser.held_from`): the header, the configuration, section headers and
footers, every RAM page record. Everything from the first byte QEMU alone can delimit
(device state after RAM, the EOF marker, the VM description, opaque sections) is held
back until the image's length and checksum (or, for a raw stream, its structure to the
end) are proven. It is a sink wrapped around another sink, so it works the same from
either pump (threads, or trio) and sees exactly the bytes that move.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from .._buffers import new_hasher
from .._errors import StreamError, TransportError
from .._transport import Sink
from ..stream import Command, DeviceSection, Event, StreamParser
from ._decompress import TOOLS, Decompressor
from ._detect import MIN_HEAD, Detected, detect
from ._header import ImageHeader

if TYPE_CHECKING:
    from ._libvirt import LibvirtHeader


class VerifyingReader(Sink):
    """Restore: recognise what is coming and pass the bare QEMU stream to ``inner``.

    Every format passes the bare stream on only as far as the parser followed it
    exactly; the rest is held back (see the module's docstring) until, for a
    vmtransport image, the header was intact and complete and the payload's length and
    checksum hold, and for every format the stream's structure holds to its end. If the
    consumer stops reading first (QEMU refused something), the rest is still read and
    verified so the error names the real cause. libvirt save
    images: ``LibvirtQemudPart`` is refused; the XML is skipped; compressed payloads go
    through the compressor's own program, as libvirt does it.

    After commit, the attributes describe what was read (``inspect`` shows them). With
    ``inspect=True`` problems are recorded in :attr:`problems` instead of raised, so a
    partial or corrupt image can still be described.
    """

    def __init__(self, inner: Sink, label: str, *, inspect: bool = False) -> None:
        self._inner = inner
        self.label = label
        self.inspecting = inspect
        self.problems: list[str] = []
        self.devices: list[DeviceSection] = []
        self.commands: list[Command] = []
        self._parser_failed = False
        self._parser_closed = False
        self.format: str | None = None
        self.header: ImageHeader | None = None
        self.libvirt: LibvirtHeader | None = None
        self.parser = StreamParser()
        self.checksum_ok: bool | None = None
        self.stream_length = 0
        self._head = bytearray()
        self._need = MIN_HEAD
        self._hash: Any = None
        self._payload_seen = 0
        self._eof_limit: int | None = None  # a complete image's recorded EOF offset
        # An image's setup checksum (length, digest) until proven; the bytes meanwhile
        self._setup: tuple[int, str] | None = None
        self._setup_buf = bytearray()
        self._held = Holdback()
        self._pending = bytearray()  # bytes not yet followed by the parser (see _route)
        self._forwarded = 0
        self._gone: TransportError | None = None  # the consumer stopped reading
        self._decomp: Decompressor | None = None

    # -- detection
    def write(self, data: memoryview) -> None:
        if self.format is not None:
            self._payload(data)
            return
        # Detect on the pump's own buffer when it holds enough: the payload then passes
        # on as views of it, page aligned, with no copy.
        if self._head:
            self._head += data
            buf: bytes | bytearray | memoryview = self._head
        else:
            buf = data
        if len(buf) < self._need or (skip := self._detect(buf)) is None:
            if buf is data:
                self._head += data
            return
        self._head = bytearray()
        with memoryview(buf) as whole:
            if len(whole) > skip:
                self._payload(whole[skip:])

    def _detect(self, head: bytes | bytearray | memoryview) -> int | None:
        """Decide the format; return where the payload starts, None to wait for more."""
        found = detect(head, self.label)
        if isinstance(found, int):
            self._need = found
            return None
        self._start(found)
        return found.payload_offset

    def _start(self, found: Detected) -> None:
        header, lv = found.header, found.libvirt
        if header is not None:
            if not header.complete:
                self._problem(
                    f"{self.label}: the image is partial: the save that wrote it never "
                    "finished; refusing to restore it"
                )
            self.header = header
            self._hash = new_hasher()
            if header.complete:
                self._eof_limit = header.eof_offset
                self._setup = self._setup_of(header)
        elif lv is not None:
            if lv.partial:
                self._problem(
                    f"{self.label}: libvirt image is partial (marked LibvirtQemudPart): libvirt "
                    "never finished writing it; refusing to restore it"
                )
            if lv.format == "sparse":
                raise StreamError(f"{self.label}: libvirt 'sparse' (mapped-ram) images are "
                                  "not supported yet")  # fmt: skip
            self.libvirt = lv
            if lv.format != "raw":
                self._decomp = Decompressor(TOOLS[lv.format], self.label, self._stream)
        self.format = found.format

    def _setup_of(self, header: ImageHeader) -> tuple[int, str] | None:
        stream = header.metadata.get("stream")
        setup = stream.get("setup") if isinstance(stream, dict) else None
        if setup is None:
            return None  # written before setup checksums (or the setup was too long)
        length = setup.get("length") if isinstance(setup, dict) else None
        digest = setup.get("xxh3_128") if isinstance(setup, dict) else None
        if not (isinstance(length, int) and 0 < length <= header.payload_length) or not (
            isinstance(digest, str)
        ):
            self._problem(f"{self.label}: the image's setup checksum entry is malformed")
            return None
        return length, digest

    def _problem(self, message: str) -> None:
        if not self.inspecting:
            raise StreamError(message)
        self.problems.append(message)

    def _events(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, DeviceSection):
                self.devices.append(e)
            elif isinstance(e, Command):
                self.commands.append(e)

    # -- payload
    def _payload(self, data: memoryview) -> None:
        if self._decomp is not None:
            self._decomp.feed(data)
        elif self.header is not None:
            self._image_payload(data)
        else:
            self._stream(data)

    def _stream(self, data: memoryview) -> None:
        """Bytes of the bare QEMU stream: validate, then hand on what may go now."""
        if not self._parser_failed:
            try:
                self._events(self.parser.feed(data))
            except StreamError as exc:
                self._parser_failed = True
                self._problem(f"{self.label}: {exc}")
        start = self.stream_length
        self.stream_length += len(data)
        if self._setup is not None:
            self._hold_setup(start, data)
        else:
            self._route(start, data)

    def _hold_setup(self, start: int, data: memoryview) -> None:
        """Nothing goes to QEMU until the setup's own checksum holds: QEMU checks the
        setup against its VM and refuses it at once (and ends an exec: helper) before
        the image's end could be read to say the image was damaged."""
        assert self._setup is not None
        length, digest = self._setup
        if self._setup_buf or len(data) < length:
            # The setup spans buffers (rare: it is a few hundred bytes): gather it.
            self._setup_buf += data
            if len(self._setup_buf) < length:
                return
            start = self.stream_length - len(self._setup_buf)
            data = memoryview(self._setup_buf)
            self._setup_buf = bytearray()
        self._setup = None
        got = new_hasher()
        got.update(data[:length])
        if got.hexdigest() != digest:
            self._problem(
                f"{self.label}: checksum mismatch in the stream's setup (its first {length} "
                "bytes: configuration, sections, RAM blocks): the image is corrupt; QEMU "
                "was given none of it"
            )
        self._route(start, data)

    def _route(self, start: int, data: memoryview) -> None:
        """Forward what the parser followed exactly; hold the rest (see the module)."""
        if self._held:
            self._held.append(data)
            return
        if self._pending:
            # What the parser had not followed at the last buffer's end (an element cut
            # by the buffer: a few KiB at most) goes first, as far as it is followed now.
            pending, self._pending = self._pending, bytearray()
            self._route_one(start - len(pending), memoryview(pending))
            if self._held:
                self._held.append(data)
                return
            if self._pending:  # still not followed: this element spans data too
                self._pending += data
                return
        self._route_one(start, data)

    def _route_one(self, start: int, data: memoryview) -> None:
        limit = self.parser.held_from
        if self._eof_limit is not None and (limit is None or self._eof_limit < limit):
            limit = self._eof_limit
        cut = len(data) if limit is None else max(0, min(len(data), limit - start))
        # Not past what the parser has followed: an element it has only begun (a stream
        # cut inside a section header, say) is not QEMU's before the parser knows it.
        followed = cut
        if not self._parser_failed:  # (failed: the restore fails; inspect forwards nowhere)
            followed = max(0, min(cut, self.parser.offset - start))
        if followed:
            self._forward(data[:followed])
        if cut < len(data):  # holding starts here: the rest, unfollowed bytes included
            self._held.append(data[followed:])
        elif followed < len(data):
            self._pending = bytearray(data[followed:])

    def _forward(self, data: memoryview) -> None:
        if self._gone is not None:
            return
        try:
            self._inner.write(data)
        except TransportError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, OSError) and cause.errno in _CONSUMER_GONE):
                raise
            # QEMU closed its end: it refused something. Read and verify the rest, so
            # the error names the cause (a corrupt image) rather than the broken pipe.
            self._gone = exc
            return
        self._forwarded += len(data)

    def _close_parser(self) -> None:
        if self._parser_failed or self._parser_closed:
            return
        self._parser_closed = True
        try:
            self._events(self.parser.close())
        except StreamError as exc:
            self._problem(f"{self.label}: incomplete migration stream: {exc}")

    def _image_payload(self, data: memoryview) -> None:
        header = self.header
        assert header is not None
        start = self._payload_seen
        end = start + len(data)
        if end > header.payload_length and header.complete:
            self._problem(
                f"{self.label}: data after the payload's declared end "
                f"({header.payload_length} bytes)"
            )
            data = data[: max(0, header.payload_length - start)]
            end = start + len(data)
        self._payload_seen = end
        self._hash.update(data)
        self._stream(data)

    def commit(self) -> None:
        if self.format is None:
            raise StreamError(
                f"{self.label}: too short for a migration stream or image ({len(self._head)} bytes)"
            )
        if self._decomp is not None:
            self._decomp.finish()
        if self.header is not None and self.header.complete:
            self._verify_image(self.header)
        # The end is parsed, and refused if wrong (cut, or followed by a second stream),
        # before QEMU is given any of it.
        self._close_parser()
        if self._pending:  # proven whole: what waited for the parser goes before the rest
            self._forward(memoryview(self._pending))
            self._pending = bytearray()
        self._held.replay(self._forward)
        proven = "its checksum holds" if self.checksum_ok else "its structure holds"
        if self._gone is not None:
            raise TransportError(
                f"{self.label}: the consumer stopped reading after {self._forwarded} of "
                f"{self.stream_length} stream bytes ({self._gone}); the image was read to "
                f"the end and {proven}, so the consumer refused it (QEMU: see its log)"
            )
        try:
            self._inner.commit()
        except TransportError as exc:
            # The image is proven by now: what failed is the consumer's taking of it.
            raise TransportError(
                f"{self.label}: the image was read to the end and {proven}, but its "
                f"consumer did not take the whole stream (QEMU: see its log): {exc}"
            ) from exc

    def _verify_image(self, header: ImageHeader) -> None:
        # Each _problem raises unless inspecting; an inspection goes on to parse the end.
        stopped = (
            f" (the consumer had stopped reading after {self._forwarded} stream bytes)"
            if self._gone is not None
            else ""
        )
        if self._payload_seen != header.payload_length:
            self._problem(
                f"{self.label}: image truncated: {self._payload_seen} of "
                f"{header.payload_length} payload bytes{stopped}"
            )
        else:
            self.checksum_ok = self._hash.digest() == header.checksum
            if not self.checksum_ok:
                self._problem(
                    f"{self.label}: checksum mismatch: the image is corrupt; QEMU was not "
                    f"given the end of the stream{stopped}"
                )

    def abort(self) -> None:
        if self._decomp is not None:
            self._decomp.kill()
        self._held.close()
        self._inner.abort()

    def cancel(self) -> None:
        self._inner.cancel()


#: a write's errno that means the consumer closed its end (QEMU exited or failed the load)
_CONSUMER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET})


class Holdback:
    """The bytes a restore holds back: in memory up to :attr:`MEMORY`, then spooled to
    an unnamed temporary file (``$TMPDIR``, 0600), so a stream whose held part is
    large (an opaque section early in it) costs disk, not memory."""

    MEMORY = 64 << 20
    CHUNK = 1 << 20

    def __init__(self) -> None:
        self._mem = bytearray()
        self._file: IO[bytes] | None = None
        self.size = 0

    def __bool__(self) -> bool:
        return self.size > 0

    def append(self, data: memoryview) -> None:
        self.size += len(data)
        if self._file is None and len(self._mem) + len(data) <= self.MEMORY:
            self._mem += data
            return
        if self._file is None:
            import tempfile  # rare: only for a large held part

            self._file = tempfile.TemporaryFile(prefix="vmtransport-held-")
            self._file.write(self._mem)
            self._mem = bytearray()
        self._file.write(data)

    def replay(self, write: Callable[[memoryview], None]) -> None:
        """Hand every held byte to ``write`` in order, then forget them."""
        if self._file is None:
            with memoryview(self._mem) as view:
                for i in range(0, len(view), self.CHUNK):
                    write(view[i : i + self.CHUNK])
        else:
            self._file.seek(0)
            while chunk := self._file.read(self.CHUNK):
                write(memoryview(chunk))
        self.close()

    def close(self) -> None:
        self._mem = bytearray()
        self.size = 0
        if self._file is not None:
            self._file.close()
            self._file = None
