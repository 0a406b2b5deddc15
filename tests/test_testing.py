"""vmtransport.testing: its synthetic streams are complete QEMU streams, exactly as long
and shaped as asked, where its layout says each part is, and made as they are consumed.

Each stream is checked by vmtransport's parser and by the independent reading of QEMU's
format in tests/helpers.py (:func:`helpers.stream_violation`).
"""

from __future__ import annotations

import json
import stat
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from helpers import stream_violation

from vmtransport.stream import (
    BlockStats,
    Command,
    Configuration,
    DeviceSection,
    StreamParser,
    VMDescription,
)
from vmtransport.testing import PAGE_SIZE, Device, StreamWriter, SyntheticStream

MIB = 1 << 20

SHAPES: dict[str, dict[str, Any]] = {
    "no pages": {"pages": 0},
    "one page": {"pages": 1, "seed": 7},
    "zero pages among them": {"pages": 1000, "zero_fraction": 0.3},
    "mostly zero pages, small sections": {
        "pages": 513, "pages_per_section": 7, "zero_fraction": 0.9, "distinct_pages": 5,
        "runstate": "paused",
    },
    "QEMU 10.0 without a description": {
        "pages": 700, "switchover_start": True, "description": False, "machine": "pc-q35-10.0",
    },
    "RAM smaller than the pages sent": {"pages": 600, "ram_size": MIB, "block": "mem"},
    "its own devices": {"pages": 10, "devices": [Device("a", b"x"), Device("b", b"", 1, 3)]},
    "an exact size": {"size": 3 * MIB + 123, "zero_fraction": 0.5},
}  # fmt: skip


def parse_chunks(stream: SyntheticStream) -> tuple[StreamParser, list[Any]]:
    parser = StreamParser(require_description=stream.has_description)
    events = []
    for chunk in stream.chunks():
        events += parser.feed(chunk)
    return parser, events + parser.close()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_synthetic_stream_is_what_it_says(shape: str) -> None:
    s = SyntheticStream(**SHAPES[shape])
    data = bytes(s)
    assert len(data) == len(s) == s.layout.length
    assert stream_violation(data) is None
    p, events = parse_chunks(s)
    assert p.complete and p.offset == len(data)
    assert p.ram_blocks == {s.block: BlockStats(s.ram_size, s.normal_pages, s.zero_pages)}
    assert s.normal_pages + s.zero_pages == s.pages
    assert p.ram_iterations == len(s.layout.ram_sections) - 2  # PARTs between START, END
    (config,) = [e for e in events if isinstance(e, Configuration)]
    assert config.machine_type == s.machine
    devices = [e for e in events if isinstance(e, DeviceSection)]
    assert [(d.idstr, d.instance_id, d.version_id, d.size) for d in devices] == [
        (d.idstr, d.instance_id, d.version_id, len(d.state)) for d in s.devices
    ]
    assert [d.offset for d in devices] == [d.offset for d in s.layout.device_sections]
    assert p.eof_offset == s.layout.eof
    commands = [e.name for e in events if isinstance(e, Command)]
    assert commands == (["SWITCHOVER_START"] if s.switchover_start else [])
    descriptions = [e.json for e in events if isinstance(e, VMDescription)]
    assert descriptions == ([s.description_json()] if s.has_description else [])
    if "devices" not in SHAPES[shape]:
        assert p.runstate == s.runstate


def be32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


def test_the_layout_points_at_each_part() -> None:
    s = SyntheticStream(300, zero_fraction=0.25, pages_per_section=64, switchover_start=True)
    data = bytes(s)
    layout = s.layout
    assert data[: layout.configuration + 1] == b"QEVM\0\0\0\3\x07"
    types = {"start": 1, "part": 2, "end": 3, "full": 4}
    following = [*(x.offset for x in layout.sections[1:]), layout.eof]
    for section, after in zip(layout.sections, following, strict=True):
        assert data[section.offset] == types[section.kind]
        assert be32(data, section.offset + 1) == section.section_id
        if section.kind in ("start", "full"):
            assert data[section.offset + 6 : section.body - 8] == section.idstr.encode()
        assert data[section.footer] == 0x7E
        assert be32(data, section.footer + 1) == section.section_id
        assert section.end in (after, after - 5)  # or the command before RAM's END
    assert [data[c] for c in layout.commands] == [0x08]
    assert layout.commands[0] == layout.ram_sections[-1].offset - 5
    assert len(layout.pages) == 300 == len(layout.pages[:])
    for page in layout.pages:
        word = int.from_bytes(data[page.header : page.header + 8], "big")
        assert word & ~0xFFF == page.ram_offset == page.number * PAGE_SIZE
        assert word & 0xFFF == (0x02 if page.zero else 0x08) | (0x20 if page.number else 0)
        assert data[page.data : page.end] == (b"\0" if page.zero else s.page_data(page.number))
    assert layout.pages[-1] == layout.pages[299]
    with pytest.raises(IndexError):
        layout.pages[300]
    assert data[layout.eof] == 0
    assert layout.description == layout.eof + 1 and data[layout.description] == 0x06
    length = be32(data, layout.description + 1)
    assert layout.description + 5 + length == len(data)
    assert json.loads(data[layout.description + 5 :]) == s.description_json()


_MIN = len(SyntheticStream(0))


@pytest.mark.parametrize(
    "size", [_MIN, _MIN + 1, _MIN + 8, _MIN + 9, _MIN + 4104, _MIN + 4105, 5 * MIB - 1]
)
@pytest.mark.parametrize("zero_fraction", [0.0, 0.5])
def test_exact_sizes(size: int, zero_fraction: float) -> None:
    s = SyntheticStream(size=size, zero_fraction=zero_fraction)
    data = bytes(s)
    assert len(data) == size
    assert stream_violation(data) is None
    # As many pages as fit: one more would not.
    assert len(SyntheticStream(s.pages + 1, zero_fraction=zero_fraction)) > size


def test_a_multi_gib_stream_is_made_as_it_goes() -> None:
    """A 1 GiB stream (and its length, computed) in chunks of a section: parsed as it is
    made, it never sits in memory."""
    s = SyntheticStream(size=(1 << 30) + 12345, distinct_pages=16)
    assert len(s) == (1 << 30) + 12345
    parser = StreamParser(require_description=True)
    total = biggest = 0
    tracemalloc.start()
    try:
        for chunk in s.chunks():
            parser.feed(chunk)
            total += len(chunk)
            biggest = max(biggest, len(chunk))
        parser.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parser.complete and total == len(s)
    assert biggest <= 256 * (8 + PAGE_SIZE) + 100
    assert peak < 8 * MIB, f"{peak} bytes allocated at once"


def test_seeds_and_page_contents() -> None:
    a, b, c = SyntheticStream(50, seed=1), SyntheticStream(50, seed=1), SyntheticStream(50, seed=2)
    assert bytes(a) == bytes(b) != bytes(c)
    assert a.layout == c.layout  # the same shape, other pages
    assert len({a.page_data(i) for i in range(50)}) == 50
    cycling = SyntheticStream(50, distinct_pages=3, zero_fraction=0.2)
    assert len({cycling.page_data(i) for i in range(50) if not cycling.is_zero(i)}) == 3
    assert {cycling.page_data(i) for i in range(50) if cycling.is_zero(i)} == {bytes(PAGE_SIZE)}
    assert cycling.zero_pages == 10
    for bad in (-1, 50):
        with pytest.raises(IndexError):
            a.page_data(bad)


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({}, "give either pages or size"),
        ({"pages": 1, "size": 10_000}, "give either pages or size"),
        ({"pages": -1}, "must not be negative"),
        ({"size": 100}, "no stream is as short as 100 bytes"),
        ({"size": 10_000, "devices": []}, "needs a device section to pad"),
        ({"pages": 1, "zero_fraction": 1.5}, "zero_fraction must be within"),
        ({"pages": 1, "pages_per_section": 0}, "pages_per_section must be positive"),
        ({"pages": 1, "distinct_pages": 0}, "distinct_pages must be positive"),
        ({"pages": 1, "ram_size": 1000}, "ram_size must be a positive multiple of 4096"),
        ({"pages": 1, "runstate": "x" * 100}, "longer than QEMU's 100-byte buffer"),
    ],
)
def test_bad_knobs(knobs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticStream(**knobs)


def test_write_to(tmp_path: Path) -> None:
    s = SyntheticStream(20)
    path = s.write_to(tmp_path / "stream")
    assert path.read_bytes() == bytes(s)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_stream_writer_writes_what_it_is_told() -> None:
    w = StreamWriter()
    assert w.offset == 8
    w.configuration("pc-q35-10.0", StreamWriter.capabilities("events"))
    w.section_start(2, "ram").block_list([("pc.ram", MIB)]).eos().footer(2)
    at = w.offset
    w.section_part(2).page(0, block="pc.ram").zero_page(PAGE_SIZE).eos().footer(2)
    assert w.getvalue()[at] == 0x02
    w.command(11).section_part(2, end=True).eos().footer(2)
    data = w.finish([Device("timer", bytes(24))], section_ids=[0])
    assert stream_violation(data) is None
    p = StreamParser(require_description=True)
    p.feed(data)
    p.close()
    assert p.ram_blocks["pc.ram"] == BlockStats(MIB, 1, 1)
    # Without footers (machine types before 2.4) and without a description.
    bare = StreamWriter(footers=False).configuration()
    bare.section_start(2, "ram").block_list([("pc.ram", MIB)]).eos().footer(2)
    assert bare.getvalue().endswith((0x10).to_bytes(8, "big"))
    assert StreamWriter(header=False).eof().getvalue() == b"\0"
    assert StreamWriter().finish(description=False) == b"QEVM\0\0\0\3\0"
