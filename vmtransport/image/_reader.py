"""Restore: the sink that recognises what is coming and passes the bare QEMU stream on,
verified.

A raw stream passes through, validated as it goes. For a vmtransport image, the stream
from QEMU's EOF marker on is withheld until the payload's length and checksum are
verified, so a corrupt or truncated image makes QEMU's load fail instead of a damaged
VM resuming. It is a sink wrapped around another sink, so it works the same from
either pump (threads, or trio) and sees exactly the bytes that move.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._buffers import new_hasher
from .._errors import StreamError
from .._transport import Sink
from ..stream import Command, DeviceSection, Event, StreamParser
from ._decompress import TOOLS, Decompressor
from ._detect import MIN_HEAD, Detected, detect
from ._header import ImageHeader

if TYPE_CHECKING:
    from ._libvirt import LibvirtHeader


class VerifyingReader(Sink):
    """Restore: recognise what is coming and pass the bare QEMU stream to ``inner``.

    Raw streams pass through (validated as they go). vmtransport images: the header must
    be intact and complete; the payload passes up to QEMU's EOF marker, the rest is
    held back until the payload's length and checksum are verified. libvirt save
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
        self._withheld = bytearray()
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

    def _stream(self, data: memoryview, *, forward: bool = True) -> None:
        """Bytes of the bare QEMU stream: validate, then hand on."""
        if not self._parser_failed:
            try:
                self._events(self.parser.feed(data))
            except StreamError as exc:
                self._parser_failed = True
                self._problem(f"{self.label}: {exc}")
        self.stream_length += len(data)
        if forward:
            self._inner.write(data)

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
        # A partial image (inspect only) has no EOF offset: nothing to hold back.
        eof = header.eof_offset if header.complete else end
        cut = max(0, min(len(data), eof - start))
        if cut:
            self._stream(data[:cut])
        if cut < len(data):
            self._withheld += data[cut:]

    def commit(self) -> None:
        if self.format is None:
            raise StreamError(
                f"{self.label}: too short for a migration stream or image "
                f"({len(self._head)} bytes)"
            )
        if self._decomp is not None:
            self._decomp.finish()
        if self.header is not None and self.header.complete:
            self._verify_image(self.header)
        self._close_parser()
        self._inner.commit()

    def _verify_image(self, header: ImageHeader) -> None:
        # Each _problem raises unless inspecting; an inspection goes on to parse the end.
        if self._payload_seen != header.payload_length:
            self._problem(
                f"{self.label}: image truncated: {self._payload_seen} of "
                f"{header.payload_length} payload bytes"
            )
        else:
            self.checksum_ok = self._hash.digest() == header.checksum
            if not self.checksum_ok:
                self._problem(
                    f"{self.label}: checksum mismatch: the image is corrupt; QEMU was not "
                    "given the end of the stream"
                )
        # The end is parsed, and refused if wrong (cut, or followed by a second stream),
        # before QEMU is given any of it.
        with memoryview(bytes(self._withheld)) as view:
            self._withheld = bytearray()
            self._stream(view, forward=False)
            self._close_parser()
            self._inner.write(view)

    def abort(self) -> None:
        if self._decomp is not None:
            self._decomp.kill()
        self._inner.abort()

    def cancel(self) -> None:
        self._inner.cancel()
