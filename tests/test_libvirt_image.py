"""Tests of the libvirt save image header reader (vmtransport.image._libvirt)."""

from __future__ import annotations

import struct
import sys

import pytest
from helpers import load_stream

from vmtransport._errors import StreamError
from vmtransport.image._libvirt import (
    FORMATS,
    HEADER_SIZE,
    build_libvirt_header,
    parse_libvirt_header,
)
from vmtransport.stream import StreamParser
from vmtransport.testing import SyntheticStream

XML = "<domain type='kvm'>\n  <name>guest-1</name>\n  <memory unit='KiB'>32768</memory>\n</domain>"
COOKIE = "<cookie><cpu mode='custom'/></cookie>"
OTHER = "big" if sys.byteorder == "little" else "little"


def test_layout_is_92_bytes_and_libvirt_padding() -> None:
    assert HEADER_SIZE == 92
    raw = build_libvirt_header(XML, was_running=True)
    assert raw[:16] == b"LibvirtQemudSave"
    assert len(raw) == 92 + len(XML) + 1 + 64 * 1024
    order = "<" if sys.byteorder == "little" else ">"
    version, data_len, running, fmt, cookie_off = struct.unpack_from(order + "5I", raw, 16)
    assert (version, data_len, running, fmt, cookie_off) == (2, len(raw) - 92, 1, 0, 0)
    assert raw[36:92] == bytes(56)


@pytest.mark.parametrize("byteorder", [sys.byteorder, OTHER])
@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip(byteorder: str, fmt: str) -> None:
    raw = build_libvirt_header(
        XML,
        was_running=False,
        format=fmt,
        cookie=COOKIE,
        byteorder="big" if byteorder == "big" else "little",
    )
    h = parse_libvirt_header(raw)
    assert h is not None
    assert (h.partial, h.version, h.was_running, h.format) == (False, 2, False, fmt)
    assert h.domain_xml == XML and h.domain_name == "guest-1"
    assert h.cookie == COOKIE
    assert h.stream_offset == len(raw) == 92 + h.data_len
    assert h.byteorder == byteorder


def test_partial_image_is_reported() -> None:
    h = parse_libvirt_header(build_libvirt_header(XML, was_running=True, partial=True))
    assert h is not None and h.partial and h.was_running and h.cookie is None


def test_not_libvirt() -> None:
    assert parse_libvirt_header(b"") is None
    assert parse_libvirt_header(bytes(SyntheticStream(0))) is None
    assert parse_libvirt_header(b"LibvirtQemudSav") is None


def test_version_1_is_raw() -> None:
    raw = bytearray(build_libvirt_header(XML, was_running=True, format="xz"))
    struct.pack_into("=I", raw, 16, 1)
    h = parse_libvirt_header(bytes(raw))
    assert h is not None and (h.version, h.format) == (1, "raw")


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        pytest.param(at, value, message, marks=pytest.mark.fault(
            f"libvirt image: {field}", direction="restore", vm="n/a (header parser)",
            disk="n/a", exit="StreamError", message=f"'{message}'",
        ))
        for field, at, value, message in [
            ("version 3", 16, 3, "version"),
            ("version 0", 16, 0, "version"),
            ("format (compressed) 7", 28, 7, "format 7"),
            ("XML length (data_len) 0", 20, 0, "lengths"),
            ("cookieOffset beyond data_len", 32, 1 << 30, "lengths"),
        ]
    ],
)  # fmt: skip
def test_bad_fields(offset: int, value: int, message: str) -> None:
    raw = bytearray(build_libvirt_header(XML, was_running=True))
    struct.pack_into("=I", raw, offset, value)
    with pytest.raises(StreamError, match=message):
        parse_libvirt_header(bytes(raw))


@pytest.mark.fault(
    "libvirt image: header truncated, XML length beyond the data, XML not UTF-8",
    direction="restore",
    vm="n/a (header parser)",
    disk="n/a",
    exit="StreamError",
    message="'truncated' / 'needs N bytes' / 'not UTF-8'",
)
def test_short_data_and_bad_text() -> None:
    raw = build_libvirt_header(XML, was_running=True)
    with pytest.raises(StreamError, match="truncated"):
        parse_libvirt_header(raw[:50])
    with pytest.raises(StreamError, match="needs"):
        parse_libvirt_header(raw[:200])
    bad = raw[:92] + b"\xff\xfe" + raw[94:]
    with pytest.raises(StreamError, match="not UTF-8"):
        parse_libvirt_header(bad)
    odd = parse_libvirt_header(build_libvirt_header("not xml", was_running=False))
    assert odd is not None and odd.domain_name is None
    with pytest.raises(ValueError, match="format"):
        build_libvirt_header(XML, was_running=False, format="lz4")


def test_header_then_real_stream() -> None:
    stream, _ = load_stream("qemu7.2-pc")
    image = build_libvirt_header(XML, was_running=True, cookie=COOKIE) + stream
    h = parse_libvirt_header(image[: 128 << 10])
    assert h is not None
    p = StreamParser()
    p.feed(image[h.stream_offset :])
    p.close()
    assert p.complete
