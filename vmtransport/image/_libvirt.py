"""libvirt's QEMU save image header (``virsh save`` files).

Layout, from libvirt's ``src/qemu/qemu_saveimage.h`` (host byte order)::

    char     magic[16]      "LibvirtQemudSave", or "LibvirtQemudPart" while incomplete
    uint32   version        1 or 2 (version 1 images are never compressed)
    uint32   data_len       bytes of XML, cookie and padding that follow the header
    uint32   was_running
    uint32   format         0 raw, 1 gzip, 2 bzip2, 3 xz, 4 lzop, 5 zstd, 6 sparse
    uint32   cookieOffset   where the cookie starts within the data (0: no cookie)
    uint32   unused[14]

then the domain XML (NUL-terminated), the cookie XML (NUL-terminated), zero padding,
and the QEMU stream at ``92 + data_len`` (not aligned).
"""

from __future__ import annotations

import struct
import sys
from typing import Final, Literal, NamedTuple, final

from .._errors import StreamError

__all__ = [
    "FORMATS",
    "HEADER_SIZE",
    "LibvirtHeader",
    "build_libvirt_header",
    "parse_libvirt_header",
]

MAGIC_SAVE: Final = b"LibvirtQemudSave"
MAGIC_PARTIAL: Final = b"LibvirtQemudPart"
SAVE_VERSION: Final = 2
HEADER_SIZE: Final = 16 + 4 * 5 + 4 * 14  # 92
FORMATS: Final = ("raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse")
# libvirt pads the data so the XML can later be edited in place to something longer.
_PADDING: Final = 64 * 1024

_FIELDS = struct.Struct("=5I")


@final
class LibvirtHeader(NamedTuple):
    """What a libvirt save image says about itself."""

    #: True for "LibvirtQemudPart": libvirt never finished writing it; refuse it.
    partial: bool
    version: int
    data_len: int
    was_running: bool
    format: str
    domain_xml: str
    domain_name: str | None
    cookie: str | None
    #: Where the QEMU stream starts in the file: HEADER_SIZE + data_len.
    stream_offset: int
    byteorder: Literal["little", "big"]


def parse_libvirt_header(data: bytes) -> LibvirtHeader | None:
    """Parse a save image's header from the file's first bytes.

    Returns None when ``data`` does not start with libvirt's magic. Raises StreamError
    when it does but the header is malformed or ``data`` is too short to hold the XML
    (pass at least ``HEADER_SIZE`` bytes, then ``stream_offset`` bytes).
    """
    magic = bytes(data[:16])
    if magic not in (MAGIC_SAVE, MAGIC_PARTIAL):
        return None
    if len(data) < HEADER_SIZE:
        raise StreamError(f"libvirt save image header truncated ({len(data)} of 92 bytes)")
    order: Literal["little", "big"] = sys.byteorder
    version, data_len, was_running, fmt, cookie_off = _FIELDS.unpack_from(data, 16)
    if version > SAVE_VERSION:
        # Written on a host of the other byte order.
        swapped = struct.unpack_from("<5I" if order == "big" else ">5I", data, 16)
        version, data_len, was_running, fmt, cookie_off = swapped
        order = "big" if order == "little" else "little"
    if not 1 <= version <= SAVE_VERSION:
        raise StreamError(f"unsupported libvirt save image version {version}")
    if version == 1:
        fmt = 0  # version 1 predates compression
    if fmt >= len(FORMATS):
        raise StreamError(f"unknown libvirt save image format {fmt}")
    if data_len == 0 or cookie_off > data_len:
        raise StreamError(
            f"bad libvirt save image lengths (data_len {data_len}, cookieOffset {cookie_off})"
        )
    end = HEADER_SIZE + data_len
    if len(data) < end:
        raise StreamError(f"libvirt save image header needs {end} bytes, only {len(data)} given")
    xml_len = cookie_off or data_len
    xml_raw = bytes(data[HEADER_SIZE : HEADER_SIZE + xml_len]).split(b"\0", 1)[0]
    cookie: str | None = None
    if cookie_off:
        raw = bytes(data[HEADER_SIZE + cookie_off : end]).split(b"\0", 1)[0]
        cookie = _text(raw, "cookie") or None
    xml = _text(xml_raw, "domain XML")
    return LibvirtHeader(
        partial=magic == MAGIC_PARTIAL,
        version=version,
        data_len=data_len,
        was_running=bool(was_running),
        format=FORMATS[fmt],
        domain_xml=xml,
        domain_name=_domain_name(xml),
        cookie=cookie,
        stream_offset=end,
        byteorder=order,
    )


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StreamError(f"libvirt save image {what} is not UTF-8: {exc}") from exc


def _domain_name(xml: str) -> str | None:
    # Imported here: every restore checks for libvirt's magic, and ElementTree (with
    # pyexpat) would otherwise hold up the first byte QEMU gets (docs/performance.md).
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    name = root.findtext("name")
    return name.strip() if name else None


def build_libvirt_header(
    domain_xml: str,
    *,
    was_running: bool,
    format: str = "raw",
    partial: bool = False,
    cookie: str | None = None,
    byteorder: Literal["little", "big"] = sys.byteorder,
) -> bytes:
    """A version 2 header with XML, cookie and padding, as libvirt writes it: the
    QEMU stream goes right after the returned bytes. For test fixtures."""
    if format not in FORMATS:
        raise ValueError(f"unknown libvirt save image format {format!r}")
    xml = domain_xml.encode() + b"\0"
    ck = cookie.encode() + b"\0" if cookie is not None else b""
    data_len = len(xml) + len(ck) + _PADDING
    fields = struct.pack(
        "<5I" if byteorder == "little" else ">5I",
        SAVE_VERSION,
        data_len,
        int(was_running),
        FORMATS.index(format),
        len(xml) if cookie is not None else 0,
    )
    head = (MAGIC_PARTIAL if partial else MAGIC_SAVE) + fields + bytes(4 * 14)
    return head + xml + ck + bytes(_PADDING)
