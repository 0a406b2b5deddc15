"""The vmtransport image format, and the sinks that write and read it.

An image is a fixed 64 KiB header followed by the payload (docs/image-format.md has
every byte)::

    0       header: magic, version, state (partial|complete), payload kind, payload
            offset and length, checksum (XXH3-128), EOF offset, metadata JSON, CRC32
    65536   payload: the bare QEMU migration stream (kind 1); a later version may put
            QEMU's mapped-ram file: layout here instead (kind 2, reserved)

The header's size is a multiple of 4 KiB (O_DIRECT keeps working) and of 64 KiB.
A save writes it "partial" first and rewrites it "complete" only once the stream has
ended at QEMU's EOF and been synced; the file is renamed into place after that.

Both directions are sinks wrapped around another sink, so they work the same from
either pump (threads, or trio) and see exactly the bytes that move:

* :class:`StreamWriter` — save: validates the stream as it passes (a tap of the sans-io
  parser), and for seekable targets writes the image header and checksum.
* :class:`StreamReader` — restore: detects a raw stream, an image or a libvirt save
  image from the first bytes and hands the bare QEMU stream on; for images it withholds
  the stream from QEMU's EOF marker on until length and checksum are verified, so a
  corrupt or truncated image makes QEMU's load fail instead of a damaged VM resuming.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Final, NamedTuple, final

from ._buffers import BlockingReader, Checksum, aligned_buffer, new_hasher
from ._errors import StreamError, TransportError
from ._transport import SeekableSink, Sink, Transport
from .stream import StreamParser

MAGIC: Final = b"VMTIMAGE"
FORMAT_VERSION: Final = 1
HEADER_SIZE: Final = 64 * 1024
STATE_PARTIAL: Final = 0
STATE_COMPLETE: Final = 1
PAYLOAD_STREAM: Final = 1  #: the QEMU migration stream, as QEMU wrote it
PAYLOAD_MAPPED_RAM: Final = 2  #: reserved: QEMU's file: mapped-ram layout
CHECKSUM_XXH3_128: Final = 1
QEMU_MAGIC: Final = b"QEVM"

# magic, version, header size, state, payload kind, payload offset, payload length,
# checksum algorithm, metadata length, checksum, EOF offset, header CRC32
_FIXED = struct.Struct("<8sIIIIQQII16sQI")
_CRC_AT: Final = _FIXED.size - 4
METADATA_AT: Final = 128
MAX_METADATA: Final = HEADER_SIZE - METADATA_AT
#: the most a restore holds back (EOF marker + VM description; QEMU's are KiB)
MAX_WITHHELD: Final = 64 << 20
#: libvirt's header + XML is normally 64 KiB; refuse absurd claims before buffering
MAX_LIBVIRT_HEADER: Final = 16 << 20

_STATES = {STATE_PARTIAL: "partial", STATE_COMPLETE: "complete"}
_KINDS = {PAYLOAD_STREAM: "qemu-stream", PAYLOAD_MAPPED_RAM: "qemu-mapped-ram"}


@final
class ImageHeader(NamedTuple):
    state: int
    payload_length: int
    checksum: bytes
    eof_offset: int
    metadata: dict[str, Any]
    payload_kind: int = PAYLOAD_STREAM
    payload_offset: int = HEADER_SIZE
    checksum_algorithm: int = CHECKSUM_XXH3_128
    version: int = FORMAT_VERSION

    @property
    def complete(self) -> bool:
        return self.state == STATE_COMPLETE

    @property
    def state_name(self) -> str:
        return _STATES.get(self.state, f"unknown({self.state})")

    @property
    def payload_kind_name(self) -> str:
        return _KINDS.get(self.payload_kind, f"unknown({self.payload_kind})")

    def encode(self) -> bytes:
        meta = _json_bytes(self.metadata) if self.metadata else b"{}"
        if len(meta) > MAX_METADATA:
            raise StreamError(f"image metadata too large ({len(meta)} bytes)")
        buf = bytearray(HEADER_SIZE)
        _FIXED.pack_into(
            buf, 0, MAGIC, self.version, HEADER_SIZE, self.state, self.payload_kind,
            self.payload_offset, self.payload_length, self.checksum_algorithm, len(meta),
            self.checksum.ljust(16, b"\0"), self.eof_offset, 0,
        )  # fmt: skip
        buf[METADATA_AT : METADATA_AT + len(meta)] = meta
        struct.pack_into("<I", buf, _CRC_AT, zlib.crc32(buf))
        return bytes(buf)

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, label: str = "image") -> ImageHeader:
        if len(buf) < HEADER_SIZE:
            raise StreamError(f"{label}: image header truncated ({len(buf)} of {HEADER_SIZE})")
        raw = bytearray(buf[:HEADER_SIZE])
        (magic, version, hsize, state, kind, poff, plen, algo, mlen, csum, eof, crc) = (
            _FIXED.unpack_from(raw, 0)
        )
        if magic != MAGIC:
            raise StreamError(f"{label}: not a vmtransport image (magic {magic!r})")
        if version != FORMAT_VERSION:
            raise StreamError(f"{label}: image format version {version} is not supported")
        struct.pack_into("<I", raw, _CRC_AT, 0)
        if zlib.crc32(raw) != crc:
            raise StreamError(f"{label}: image header is corrupt (CRC mismatch)")
        if hsize != HEADER_SIZE or poff != HEADER_SIZE or mlen > MAX_METADATA:
            raise StreamError(f"{label}: inconsistent image header (sizes {hsize}/{poff}/{mlen})")
        if state not in _STATES:
            raise StreamError(f"{label}: unknown image state {state}")
        if kind != PAYLOAD_STREAM:
            raise StreamError(f"{label}: payload kind {kind} is not supported by this version")
        if algo != CHECKSUM_XXH3_128:
            raise StreamError(f"{label}: unknown checksum algorithm {algo}")
        if state == STATE_COMPLETE and not 0 <= plen - eof <= MAX_WITHHELD:
            raise StreamError(f"{label}: inconsistent image header (EOF at {eof} of {plen})")
        import json

        try:
            meta = json.loads(bytes(raw[METADATA_AT : METADATA_AT + mlen]) or b"{}")
        except (UnicodeDecodeError, ValueError) as exc:
            raise StreamError(f"{label}: image metadata is not JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise StreamError(f"{label}: image metadata is not a JSON object")
        return cls(state, plen, csum, eof, meta, kind, poff, algo, version)


def _json_bytes(obj: dict[str, Any]) -> bytes:
    import json  # not at import time: every helper start counts (see _buffers)

    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def stream_metadata(parser: StreamParser) -> dict[str, Any]:
    """What a complete stream says about the VM: for the header and ``inspect``."""
    blocks = parser.ram_blocks
    cfg = parser.configuration
    return {
        "machine_type": cfg.machine_type if cfg else None,
        "runstate": parser.runstate,
        "ram_total_bytes": sum(b.used_length for b in blocks.values()),
        "ram_blocks": [{"name": n, "used_length": b.used_length} for n, b in blocks.items()],
        "vm_description": parser.description is not None,
    }


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

    def write(self, data: memoryview) -> None:
        self._check(data)
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
        meta["stream"] = stream_metadata(self.parser)
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

    from ._version import __version__

    return {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vmtransport_version": __version__,
    }


# --- restore ---------------------------------------------------------------------------

FORMAT_RAW: Final = "qemu-stream"
FORMAT_IMAGE: Final = "vmtransport-image"
FORMAT_LIBVIRT: Final = "libvirt-save-image"

_DECOMPRESSORS = {"gzip": "gzip", "bzip2": "bzip2", "xz": "xz", "lzop": "lzop", "zstd": "zstd"}


class NullSink(Sink):
    """Discards the stream (inspect, verify)."""

    def write(self, data: memoryview) -> None:
        pass

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


@final
class _Decompressor:
    """A decompressing child (as libvirt runs one): we feed its stdin from the writer
    thread; a thread moves its stdout on to the stream consumer."""

    def __init__(self, tool: str, label: str, consume: Any) -> None:
        import subprocess
        import threading

        self.label = label
        try:
            self.proc = subprocess.Popen(
                [tool, "-dc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
        except OSError as exc:
            raise TransportError(
                f"{label}: libvirt image is {tool}-compressed and {tool} cannot run: "
                f"{exc.strerror}"
            ) from exc
        self.error: BaseException | None = None
        self._consume = consume
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        try:
            while chunk := self.proc.stdout.read1(1 << 20):  # type: ignore[attr-defined]
                with memoryview(chunk) as view:
                    self._consume(view)
        except BaseException as exc:
            self.error = exc
            self.proc.kill()

    def feed(self, data: memoryview) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
        except BrokenPipeError:
            self.finish()  # raises why it stopped
            raise StreamError(f"{self.label}: the decompressor stopped early") from None

    def finish(self) -> None:
        assert self.proc.stdin is not None and self.proc.stderr is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self._thread.join()
        # One line, as every error message: bzip2 and others explain over many.
        lines = self.proc.stderr.read().decode(errors="replace").splitlines()
        err = " | ".join([ln.strip() for ln in lines if ln.strip()][:5])
        code = self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        if self.error is not None:
            raise self.error
        if code != 0:
            raise StreamError(f"{self.label}: decompression failed (status {code}): {err}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.finish()
        except BaseException:
            pass


class StreamReader(Sink):
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
        self.devices: list[Any] = []  # stream.DeviceSection
        self.commands: list[Any] = []  # stream.Command
        self._parser_failed = False
        self.format: str | None = None
        self.header: ImageHeader | None = None
        self.libvirt: Any = None  # LibvirtHeader
        self.parser = StreamParser()
        self.checksum_ok: bool | None = None
        self.stream_length = 0
        self._head = bytearray()
        self._need = 8
        self._hash: Any = None
        self._payload_seen = 0
        self._withheld = bytearray()
        self._decomp: _Decompressor | None = None

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
        from ._libvirt_image import HEADER_SIZE as LV_HEADER
        from ._libvirt_image import MAGIC_PARTIAL, MAGIC_SAVE, parse_libvirt_header

        if bytes(head[:4]) == QEMU_MAGIC:
            self.format = FORMAT_RAW
            return 0
        if bytes(head[:8]) == MAGIC:
            if len(head) < HEADER_SIZE:
                self._need = HEADER_SIZE
                return None
            header = ImageHeader.decode(head, self.label)
            if not header.complete:
                self._problem(
                    f"{self.label}: the image is partial: the save that wrote it never "
                    "finished; refusing to restore it"
                )
            self.header = header
            self._hash = new_hasher()
            self.format = FORMAT_IMAGE
            return HEADER_SIZE
        if bytes(head[:16]) in (MAGIC_SAVE, MAGIC_PARTIAL):
            if len(head) < LV_HEADER:
                self._need = LV_HEADER
                return None
            version, data_len = struct.unpack_from("=II", head, 16)
            if version > 0xFFFF:  # written on a host of the other byte order
                # version is 1 or 2: its first byte is non-zero only in little-endian
                data_len = int.from_bytes(head[20:24], "little" if head[16] else "big")
            if data_len > MAX_LIBVIRT_HEADER:
                raise StreamError(f"{self.label}: libvirt header claims {data_len} bytes of XML")
            if len(head) < LV_HEADER + data_len:
                self._need = LV_HEADER + data_len
                return None
            try:
                lv = parse_libvirt_header(bytes(head[: LV_HEADER + data_len]))
            except StreamError as exc:  # its messages do not name the input
                raise StreamError(f"{self.label}: {exc}") from None
            assert lv is not None
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
                self._decomp = _Decompressor(
                    _DECOMPRESSORS[lv.format], self.label, self._stream
                )
            self.format = FORMAT_LIBVIRT
            return lv.stream_offset
        raise StreamError(
            f"{self.label}: neither a QEMU migration stream, a vmtransport image nor a "
            f"libvirt save image (starts with {bytes(head[:8]).hex()})"
        )

    def _problem(self, message: str) -> None:
        if not self.inspecting:
            raise StreamError(message)
        self.problems.append(message)

    def _events(self, events: list[Any]) -> None:
        from .stream import Command, DeviceSection

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
        """Bytes of the bare QEMU stream: validate, then hand on."""
        if not self._parser_failed:
            try:
                self._events(self.parser.feed(data))
            except StreamError as exc:
                self._parser_failed = True
                self._problem(f"{self.label}: {exc}")
        self.stream_length += len(data)
        self._inner.write(data)

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
        if not self._parser_failed:
            try:
                self._events(self.parser.close())
            except StreamError as exc:
                self._problem(f"{self.label}: incomplete migration stream: {exc}")
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
        with memoryview(bytes(self._withheld)) as view:
            self._stream(view)
        self._withheld = bytearray()

    def abort(self) -> None:
        if self._decomp is not None:
            self._decomp.kill()
        self._inner.abort()

    def cancel(self) -> None:
        self._inner.cancel()
