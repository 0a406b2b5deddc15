"""What a restore is reading, from its first bytes: a bare QEMU migration stream, a
vmtransport image or a libvirt save image (``virsh save``)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final, NamedTuple, final

from .._errors import StreamError
from ._header import HEADER_SIZE, MAGIC, QEMU_MAGIC, ImageHeader

if TYPE_CHECKING:
    from ._libvirt import LibvirtHeader

FORMAT_RAW: Final = "qemu-stream"
FORMAT_IMAGE: Final = "vmtransport-image"
FORMAT_LIBVIRT: Final = "libvirt-save-image"

#: bytes :func:`detect` needs before it can say anything
MIN_HEAD: Final = 8
#: libvirt's header + XML is normally 64 KiB; refuse absurd claims before buffering
MAX_LIBVIRT_HEADER: Final = 16 << 20


@final
class Detected(NamedTuple):
    format: str  #: one of the FORMAT_* names
    payload_offset: int  #: where the QEMU stream (libvirt: maybe compressed) starts
    header: ImageHeader | None = None  #: a vmtransport image's, decoded
    libvirt: LibvirtHeader | None = None  #: a libvirt save image's, parsed


def detect(head: bytes | bytearray | memoryview, label: str) -> Detected | int:
    """The format of the input that starts with ``head`` (at least :data:`MIN_HEAD`
    bytes), or how many bytes from the start it takes to tell. Raises StreamError,
    naming ``label``, for anything else and for headers that are malformed."""
    if bytes(head[:4]) == QEMU_MAGIC:
        return Detected(FORMAT_RAW, 0)
    if bytes(head[:8]) == MAGIC:
        if len(head) < HEADER_SIZE:
            return HEADER_SIZE
        return Detected(FORMAT_IMAGE, HEADER_SIZE, header=ImageHeader.decode(head, label))
    # Imported here: a save never needs it.
    from ._libvirt import HEADER_SIZE as LV_HEADER
    from ._libvirt import MAGIC_PARTIAL, MAGIC_SAVE, parse_libvirt_header

    if bytes(head[:16]) in (MAGIC_SAVE, MAGIC_PARTIAL):
        if len(head) < LV_HEADER:
            return LV_HEADER
        version: int
        data_len: int
        version, data_len = struct.unpack_from("=II", head, 16)
        if version > 0xFFFF:  # written on a host of the other byte order
            # version is 1 or 2: its first byte is non-zero only in little-endian
            data_len = int.from_bytes(head[20:24], "little" if head[16] else "big")
        if data_len > MAX_LIBVIRT_HEADER:
            raise StreamError(f"{label}: libvirt header claims {data_len} bytes of XML")
        if len(head) < LV_HEADER + data_len:
            return LV_HEADER + data_len
        try:
            lv = parse_libvirt_header(bytes(head[: LV_HEADER + data_len]))
        except StreamError as exc:  # its messages do not name the input
            raise StreamError(f"{label}: {exc}") from None
        assert lv is not None
        return Detected(FORMAT_LIBVIRT, lv.stream_offset, libvirt=lv)
    raise StreamError(
        f"{label}: neither a QEMU migration stream, a vmtransport image nor a "
        f"libvirt save image (starts with {bytes(head[:8]).hex()})"
    )
