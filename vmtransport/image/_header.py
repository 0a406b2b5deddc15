"""The vmtransport image header: format constants and the codec.

An image is a fixed 64 KiB header followed by the payload (docs/image-format.md has
every byte)::

    0       header: magic, version, state (partial|complete), payload kind, payload
            offset and length, checksum (XXH3-128), EOF offset, metadata JSON, CRC32
    65536   payload: the bare QEMU migration stream (kind 1); a later version may put
            QEMU's mapped-ram file: layout here instead (kind 2, reserved)

The header's size is a multiple of 4 KiB (O_DIRECT keeps working) and of 64 KiB.
A save writes it "partial" first and rewrites it "complete" only once the stream has
ended at QEMU's EOF and been synced; the file is renamed into place after that.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Final, NamedTuple, final

from .._errors import StreamError

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
    import json  # not at import time: every helper start counts

    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
