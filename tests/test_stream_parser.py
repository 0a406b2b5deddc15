"""Tests of the sans-io migration stream parser (vmtransport.stream).

Real streams come from tests/data/ (QEMU 7.2 and 10.0, gzipped, with a JSON sidecar
of what QEMU said about the VM) and, for the tests marked ``qemu``, from fresh VMs.
Synthetic streams written with :class:`vmtransport.testing.StreamWriter` cover what a
paused VM never produces (XBZRLE pages, postcopy's page size field, commands, bad bytes).

Regenerate the fixtures with ``.venv/bin/python tests/test_stream_parser.py tests/data``.
"""

from __future__ import annotations

import gzip
import json
import random
import shlex
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import load_stream, ramblocks_from_hmp, refused_unless_valid
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmtransport._errors import StreamError
from vmtransport.stream import (
    EOF,
    Command,
    Configuration,
    DeviceSection,
    Event,
    Header,
    RAMBlock,
    StreamParser,
    VMDescription,
)
from vmtransport.testing import Device, StreamWriter

DATA = Path(__file__).parent / "data"
FIXTURES = sorted(p.name.removesuffix(".bin.gz") for p in DATA.glob("*.bin.gz"))
# Migration streams (device-state files carry no configuration, RAM or description).
MIGRATIONS = [n for n in FIXTURES if not n.endswith("-devstate")]


# --- helpers ---------------------------------------------------------------------------


@dataclass
class Parsed:
    events: list[Event]
    parser: StreamParser

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def parse(data: bytes, chunks: Iterator[int] | None = None, **kw: Any) -> Parsed:
    """Feed data in chunks of the sizes `chunks` yields (all at once by default)."""
    p = StreamParser(**kw)
    events: list[Event] = []
    if chunks is None:
        events += p.feed(data)
    else:
        pos = 0
        while pos < len(data):
            n = next(chunks)
            events += p.feed(memoryview(data)[pos : pos + n])
            pos += n
    events += p.close()
    return Parsed(events, p)


def random_sizes(seed: int, lo: int, hi: int) -> Iterator[int]:
    r = random.Random(seed)
    while True:
        yield r.randint(lo, hi)


def fixed(n: int) -> Iterator[int]:
    while True:
        yield n


def check_layout(res: Parsed, data: bytes) -> None:
    """Device sections tile the stream from the first one up to EOF, footers between."""
    devs: list[DeviceSection] = res.of(DeviceSection)
    eof = res.parser.eof_offset
    assert eof is not None and data[eof] == 0
    for a, b in zip(devs, [*devs[1:], None], strict=True):
        head = 6 + len(a.idstr) + 8
        end = a.offset + head + a.size
        assert data[end] == 0x7E
        assert struct.unpack_from(">I", data, end + 1)[0] == a.section_id
        assert (b.offset if b else eof) == end + 5


# --- real streams from tests/data --------------------------------------------------------


def test_fixtures_present() -> None:
    kinds = {json.loads((DATA / f"{n}.json").read_text())["kind"] for n in FIXTURES}
    assert {"migration", "device-state"} <= kinds
    assert sum((DATA / f"{n}.bin.gz").stat().st_size for n in FIXTURES) < 2 << 20


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("mode", ["whole", "1-7", "8MiB", "4099"])
def test_fixture(name: str, mode: str) -> None:
    data, meta = load_stream(name)
    chunks = {
        "whole": None,
        "1-7": random_sizes(len(data), 1, 7),
        "8MiB": fixed(8 << 20),
        "4099": fixed(4099),
    }[mode]
    res = parse(data, chunks)
    p = res.parser
    assert p.complete and p.offset == len(data)
    assert isinstance(res.events[0], Header)
    devs: list[DeviceSection] = res.of(DeviceSection)
    assert [d.idstr for d in devs] == meta["devices"]
    if meta["kind"] == "device-state":
        assert p.eof_offset == len(data) - 1
        assert not res.of(Configuration) and not res.of(RAMBlock)
        assert not res.of(VMDescription)
    else:
        (conf,) = res.of(Configuration)
        assert conf.machine_type == meta["machine_type"]
        assert {b.name: b.used_length for b in res.of(RAMBlock)} == meta["ramblocks"]
        stats = p.ram_blocks
        assert {n: s.used_length for n, s in stats.items()} == meta["ramblocks"]
        for s in stats.values():  # a paused VM's first pass sends every page once
            assert s.normal_pages + s.zero_pages <= s.used_length // 4096
        (desc,) = res.of(VMDescription)
        listed = [(d["name"], d["instance_id"]) for d in desc.json["devices"]]
        assert [(d.idstr, d.instance_id) for d in devs] == listed
        assert p.eof_offset is not None and p.eof_offset < len(data)
        assert res.events[-2:] == [EOF(p.eof_offset), desc]
        cmds = [c.name for c in res.of(Command)]
        assert cmds == (["SWITCHOVER_START"] if meta["qemu"].startswith("10.") else [])
    check_layout(res, data)


@pytest.mark.parametrize("name", ["qemu7.2-pc", "qemu10.0-q35", "qemu10.0-devstate"])
def test_same_events_whatever_the_chunks(name: str) -> None:
    data, _ = load_stream(name)
    whole = parse(data).events
    for seed in range(3):
        assert parse(data, random_sizes(seed, 1, 300)).events == whole
    # two chunks: cut at every byte of the header, configuration and RAM setup, near
    # EOF, and at random places in between and in the device state
    eof = parse(data).parser.eof_offset
    assert eof is not None
    r = random.Random(name)
    cuts = {*range(1, 240), *range(max(eof - 40, 1), min(eof + 40, len(data)))}
    cuts |= {r.randrange(1, len(data)) for _ in range(150)}
    for cut in sorted(cuts):
        p = StreamParser()
        ev = p.feed(data[:cut]) + p.feed(data[cut:]) + p.close()
        assert ev == whole, cut


@pytest.mark.parametrize("name", MIGRATIONS)
def test_footer_scan_agrees_with_description(name: str) -> None:
    data, _ = load_stream(name)
    full = parse(data)
    eof = full.parser.eof_offset
    assert eof is not None
    # as if the machine suppressed the description (the caller must say so)
    bare = parse(data[: eof + 1], require_description=False)
    assert bare.parser.complete and not bare.of(VMDescription)
    assert bare.of(DeviceSection) == full.of(DeviceSection)
    for required in (True, None):  # by default a migration stream must have one
        with pytest.raises(StreamError, match="VM description is missing"):
            parse(data[: eof + 1], require_description=required)


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.fault(
    "stream cut at ~160 points of real streams",
    direction="save",
    vm="n/a (the stream parser)",
    disk="n/a",
    exit="StreamError at close()",
    message="'stream ended before QEMU's EOF marker', 'after N bytes'",
)
def test_truncated_streams_are_incomplete(name: str) -> None:
    data, meta = load_stream(name)
    eof = parse(data).parser.eof_offset
    assert eof is not None
    r = random.Random(7)
    cuts = {0, 1, 4, 7, 8, 9, len(data) - 1, eof, eof + 1, eof + 5, eof + 6}
    cuts |= {r.randrange(len(data)) for _ in range(150)}
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        p = StreamParser(require_description=meta["kind"] == "migration")
        p.feed(data[:cut])
        with pytest.raises(StreamError) as info:
            p.close()
        assert not p.complete
        if 8 < cut < eof:
            assert "stream ended before QEMU's EOF marker" in str(info.value), cut
            assert f"after {cut} bytes" in str(info.value)


@pytest.mark.fault(
    "stream cut inside the RAM section",
    direction="save",
    vm="n/a (the stream parser)",
    disk="n/a",
    exit="StreamError",
    message="'after 200 bytes, ... section 'ram''",
)
def test_truncated_message_names_the_section() -> None:
    data, _ = load_stream("qemu7.2-pc")
    p = StreamParser()
    p.feed(data[:200])
    with pytest.raises(StreamError, match=r"after 200 bytes, .*section 'ram'"):
        p.close()


@pytest.mark.fault(
    "8 bytes that are not a QEMU stream (text, ELF, libvirt magic, version 2)",
    direction="save",
    vm="n/a (the stream parser)",
    disk="n/a",
    exit="StreamError at the first bytes",
    message="'not a QEMU migration stream' / 'version 2 is obsolete'",
)
def test_non_qemu_data_refused_at_once() -> None:
    for junk in (b"GARBAGE!", b"\x7fELF\x02\x01\x01\x00", b"LibvirtQemudSave"):
        with pytest.raises(StreamError, match="not a QEMU migration stream"):
            StreamParser().feed(junk[:8])
    p = StreamParser()
    p.feed(b"QE")  # a prefix of the magic is fine
    with pytest.raises(StreamError):
        p.feed(b"X")
    with pytest.raises(StreamError, match="already found malformed"):
        p.feed(b"VM")
    with pytest.raises(StreamError, match="version 2 is obsolete"):
        StreamParser().feed(StreamWriter(header=False).header(version=2).getvalue())


def parse_error(data: bytes, chunks: Iterator[int] | None = None) -> StreamError | None:
    try:
        parse(data, chunks)
    except StreamError as exc:
        return exc
    return None


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.fault(
    "1-4 random bytes of a real stream overwritten",
    direction="save",
    vm="n/a (the stream parser)",
    disk="n/a",
    exit="StreamError unless still valid by QEMU's rules",
    message="one line",
)
def test_corrupted_bytes_are_refused_unless_still_valid(name: str) -> None:
    """Refused, or still a valid stream by QEMU's rules (helpers.stream_violation): a
    byte of a page or of a device's state changed."""
    data, _ = load_stream(name)
    r = random.Random(name)
    accepted = 0
    for i in range(100):
        buf = bytearray(data)
        for _ in range(r.randint(1, 4)):
            pos = r.randrange(len(buf)) if i % 2 else r.randrange(min(len(buf), 600))
            buf[pos] = r.randrange(256)
        error = parse_error(bytes(buf), random_sizes(i, 1, 70000))
        refused_unless_valid(bytes(buf), error)
        accepted += error is None
    assert accepted < 100  # the structure near the start is checked


_SMALL = min(FIXTURES, key=lambda n: (DATA / f"{n}.bin.gz").stat().st_size, default="")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(st.tuples(st.integers(0, 1 << 30), st.binary(min_size=0, max_size=8))),
    cut=st.integers(0, 1 << 30),
    chunk=st.integers(1, 5000),
)
@pytest.mark.fault(
    "random overwrites, inserts, deletes and cuts (hypothesis)",
    direction="save",
    vm="n/a (the stream parser)",
    disk="n/a",
    exit="StreamError unless still valid by QEMU's rules",
    message="one line",
)
def test_hypothesis_mangled_streams(edits: list[tuple[int, bytes]], cut: int, chunk: int) -> None:
    data, _ = load_stream(_SMALL)
    buf = bytearray(data)
    for pos, blob in edits:
        pos %= len(buf)
        buf[pos : pos + len(blob)] = blob  # overwrite, insert or delete bytes
    if cut % 3 == 0:
        del buf[cut % (len(buf) + 1) :]
    refused_unless_valid(bytes(buf), parse_error(bytes(buf), fixed(chunk)))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
@pytest.mark.fault(
    "random bytes after a valid header (hypothesis)",
    direction="save",
    vm="n/a (the stream parser)",
    disk="n/a",
    exit="StreamError unless still valid by QEMU's rules",
    message="one line",
)
def test_hypothesis_arbitrary_bytes_after_header(tail: bytes) -> None:
    stream = StreamWriter().getvalue() + tail
    refused_unless_valid(stream, parse_error(stream))


# --- synthetic streams (vmtransport.testing.StreamWriter) ------------------------------


def ram_stream(
    w: StreamWriter | None = None,
    pages: Callable[[StreamWriter], object] | None = None,
    devices: Sequence[tuple[int, str, bytes]] = ((0, "timer", b"\x00" * 24),),
) -> bytes:
    """A stream with RAM blocks pc.ram (1 MiB) and pc.bios (8 KiB): its PART section holds
    what ``pages`` writes (by default two normal and two zero pages), then END, the
    ``devices`` (section id, idstr, state), EOF and a VM description."""
    w = w or StreamWriter().configuration("pc-q35-10.0")
    w.section_start(2, "ram").block_list([("pc.ram", 1 << 20), ("pc.bios", 8192)]).eos().footer(2)
    w.section_part(2)
    if pages:
        pages(w)
    else:
        w.page(0, block="pc.ram").page(4096).zero_page(8192).zero_page(0, block="pc.bios")
    w.eos().footer(2).section_part(2, end=True).eos().footer(2)
    return finish(w, devices)


def finish(w: StreamWriter, devices: Sequence[tuple[int, str, bytes]], desc: bool = True) -> bytes:
    return w.finish(
        [Device(idstr, state) for _, idstr, state in devices],
        section_ids=[sid for sid, _, _ in devices],
        description=desc,
    )


def test_synthetic_basic_and_chunking() -> None:
    data = ram_stream()
    whole = parse(data)
    assert whole.parser.complete
    stats = whole.parser.ram_blocks
    assert (stats["pc.ram"].normal_pages, stats["pc.ram"].zero_pages) == (2, 1)
    assert stats["pc.bios"].zero_pages == 1
    assert whole.parser.ram_iterations == 1
    for n in range(1, 12):
        assert parse(data, fixed(n)).events == whole.events


def test_long_runs_of_pages_take_the_column_path() -> None:
    def pages(w: StreamWriter) -> None:
        w.page(0, block="pc.ram")
        for i in range(1, 200):
            w.page(i * 4096)
        for i in range(200, 256):
            w.zero_page(i * 4096)

    data = ram_stream(pages=pages)
    for chunks in (None, fixed(100_000), fixed(4104 * 20 + 3), random_sizes(1, 1, 50_000)):
        s = parse(data, chunks).parser.ram_blocks["pc.ram"]
        assert (s.normal_pages, s.zero_pages) == (200, 56)


@pytest.mark.parametrize("where", [0, 57, 120, 230])
def test_bad_offset_inside_a_long_run_is_found(where: int) -> None:
    def pages(w: StreamWriter) -> None:
        w.page(0, block="pc.ram")
        for i in range(1, 200):
            w.page((1 << 20) if i == where else i * 4096)
        for i in range(200, 256):
            w.zero_page((1 << 20) if i == where else i * 4096)

    if where == 0:
        with pytest.raises(StreamError, match=r"continues no block|beyond block"):
            parse(ram_stream(pages=lambda w: w.page(1 << 20, block="pc.ram")))
        return
    with pytest.raises(StreamError, match=r"beyond block 'pc\.ram'"):
        parse(ram_stream(pages=pages))


def test_zero_page_with_fill_byte_in_a_run() -> None:
    def pages(w: StreamWriter) -> None:
        w.zero_page(0, block="pc.ram")
        for i in range(1, 100):
            w.zero_page(i * 4096, fill=7 if i == 60 else 0)

    with pytest.raises(StreamError, match="fill byte 7"):
        parse(ram_stream(pages=pages))


def test_xbzrle_pages() -> None:
    def pages(w: StreamWriter) -> None:
        w.page(0, block="pc.ram").xbzrle_page(0, b"12345", block="pc.ram")
        w.xbzrle_page(0x1000, b"")

    data = ram_stream(pages=pages)
    for chunks in (None, fixed(1), fixed(3)):
        assert parse(data, chunks).parser.ram_blocks["pc.ram"].xbzrle_pages == 2
    bad = ram_stream(pages=lambda w: w.xbzrle_page(0, b"", block="pc.ram", encoding=2))
    with pytest.raises(StreamError, match="XBZRLE encoding"):
        parse(bad)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (0x100, "compressed RAM pages"),
        (0x80, "RDMA"),
        (0x01, "unknown RAM flags"),
        (0x18, "unknown RAM flags"),
    ],
)
@pytest.mark.fault(
    "RAM records QEMU's precopy never writes here (compressed, RDMA, unknown flags)",
    direction="save",
    vm="n/a (the stream parser)",
    disk="n/a",
    exit="StreamError",
    message="names the record: 'compressed RAM pages', 'RDMA', 'unknown RAM flags'",
)
def test_unsupported_ram_records(flags: int, message: str) -> None:
    with pytest.raises(StreamError, match=message):
        parse(ram_stream(pages=lambda w: w.ram_word(0, flags).name("pc.ram")))


@pytest.mark.fault(
    "RAM page continuing no block, or naming an unknown one",
    direction="save",
    vm="n/a (the stream parser)",
    disk="n/a",
    exit="StreamError",
    message="'continues no block' / 'unknown block ...'",
)
def test_continue_without_block_and_unknown_block() -> None:
    with pytest.raises(StreamError, match="continues no block"):
        parse(ram_stream(pages=lambda w: w.page(0)))
    with pytest.raises(StreamError, match="unknown block 'nope'"):
        parse(ram_stream(pages=lambda w: w.page(0, block="nope")))


def test_continue_across_sections_keeps_the_block() -> None:
    # QEMU remembers the last block across sections on both ends (seen on 7.2).
    def pages(w: StreamWriter) -> None:
        w.page(0, block="pc.ram").eos().footer(2).section_part(2).page(4096)

    assert parse(ram_stream(pages=pages)).parser.ram_blocks["pc.ram"].normal_pages == 2


def test_multifd_flush_and_commands() -> None:
    w = StreamWriter().configuration().command(2, b"\x00\x00\x00\x07")  # PING
    data = ram_stream(w, pages=lambda w: w.page(0, block="pc.ram").ram_word(0, 0x200))
    res = parse(data)
    assert [c.name for c in res.of(Command)] == ["PING"]
    w = StreamWriter().configuration()
    w.section_start(2, "ram").block_list([("pc.ram", 1 << 20)]).eos().footer(2)
    w.command(11).section_part(2, end=True).page(0, block="pc.ram").eos().footer(2)
    res = parse(finish(w, [(0, "timer", b"x")]))
    assert [c.name for c in res.of(Command)] == ["SWITCHOVER_START"]
    for bad, message in [((12, b""), "unknown QEMU_VM_COMMAND 12"), ((11, b"x"), "length 1")]:
        with pytest.raises(StreamError, match=message):
            parse(StreamWriter().configuration().command(*bad).finish())


def test_packaged_command_is_skipped() -> None:
    nested = b"\x04whatever the package holds"
    w = StreamWriter().configuration().command(7, struct.pack(">I", len(nested))).raw(nested)
    res = parse(finish(w, [(3, "timer", b"y")]), fixed(3))
    assert [c.name for c in res.of(Command)] == ["PACKAGED"]
    assert res.parser.complete


def test_postcopy_page_size_field() -> None:
    # With POSTCOPY_ADVISE (16 bytes) the block list carries a be64 page size for blocks
    # on huge pages; the destination only reads it when postcopy was advised.
    def extra(name: str) -> bytes:
        return struct.pack(">Q", 2 << 20) if name == "pc.ram" else b""

    w = StreamWriter().configuration().command(3, struct.pack(">QQ", (2 << 20) | 4096, 4096))
    w.section_start(2, "ram").block_list([("pc.ram", 4 << 20), ("pc.bios", 8192)], extra)
    w.eos().footer(2).section_part(2, end=True).page(0, block="pc.ram").eos().footer(2)
    res = parse(finish(w, [(0, "timer", b"")]))
    assert [(r.name, r.used_length) for r in res.of(RAMBlock)] == [
        ("pc.ram", 4 << 20),
        ("pc.bios", 8192),
    ]


def test_capabilities_subsection_and_ignore_shared() -> None:
    caps = StreamWriter.capabilities("x-ignore-shared")
    uuid = StreamWriter.uuid(bytes(range(16)))
    w = StreamWriter().configuration("pc-i440fx-7.2", caps, uuid)
    w.section_start(2, "ram").block_list([("pc.ram", 1 << 20)], lambda n: bytes(8))  # address
    w.eos().footer(2).section_part(2, end=True).eos().footer(2)
    res = parse(finish(w, [(0, "timer", b"")]), fixed(5))
    (conf,) = res.of(Configuration)
    assert conf.capabilities == ("x-ignore-shared",)
    assert conf.uuid == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert res.parser.complete


def test_target_page_bits_and_mapped_ram() -> None:
    w = StreamWriter().configuration("virt-10.0", StreamWriter.target_page_bits(16))
    w.section_start(2, "ram").block_list([("mach-virt.ram", 1 << 20)]).eos().footer(2)
    w.section_part(2, end=True).page(0, bytes(1 << 16), block="mach-virt.ram").eos().footer(2)
    res = parse(finish(w, [(0, "timer", b"")]))
    assert res.parser.ram_blocks["mach-virt.ram"].normal_pages == 1
    mapped = StreamWriter.capabilities("mapped-ram")
    with pytest.raises(StreamError, match="mapped-ram"):
        parse(StreamWriter().configuration("pc", mapped).finish())
    odd = StreamWriter.subsection("configuration/odd", b"")
    with pytest.raises(StreamError, match="unknown configuration subsection"):
        parse(StreamWriter().configuration("pc", odd).finish())


def test_early_setup_device_before_ram() -> None:
    # virtio-mem's early_setup state is a FULL section saved before RAM starts.
    w = StreamWriter().configuration()
    w.device(Device("virtio-mem-early", b"\x7e\x00\x00\x00\x09junk" + bytes(50)), 9)
    data = ram_stream(w)
    res = parse(data, fixed(7))
    first = res.of(DeviceSection)[0]
    assert (first.idstr, first.size) == ("virtio-mem-early", 59)
    assert res.parser.complete


def test_stream_without_footers() -> None:
    # Machine types before 2.4 send no footers: the description delimits devices.
    w = StreamWriter(footers=False).configuration("pc-i440fx-2.3")
    data = ram_stream(w, devices=[(0, "timer", b"\x01" * 24), (4, "cpu", b"\x04timer")])
    res = parse(data, fixed(13))
    assert [(d.idstr, d.size) for d in res.of(DeviceSection)] == [("timer", 24), ("cpu", 6)]
    eof = res.parser.eof_offset
    assert eof is not None
    with pytest.raises(StreamError, match="neither section footers nor a VM description"):
        parse(data[: eof + 1])


@pytest.mark.fault(
    "VM description not matching the devices, not JSON, or followed by bytes",
    direction="save",
    vm="n/a (the stream parser)",
    disk="n/a",
    exit="StreamError",
    message="names the device / 'not valid JSON' / 'N bytes after the end of QEMU's stream'",
)
def test_description_mismatch_and_trailing_bytes() -> None:
    data = ram_stream(devices=[(0, "timer", b"a"), (5, "apic", b"b")])
    eof = parse(data).parser.eof_offset
    assert eof is not None
    for listed, message in [(["timer"], "'timer' lacks its footer"), (["apic"], "'timer'.*not in")]:
        j = json.dumps({"devices": [{"name": n, "instance_id": 0} for n in listed]}).encode()
        wrong = data[: eof + 1] + StreamWriter(header=False).description(j).getvalue()
        with pytest.raises(StreamError, match=message):
            parse(wrong)
    with pytest.raises(StreamError, match="1 bytes after the end of QEMU's stream"):
        parse(data + b"\x00")
    bad_json = data[: eof + 1] + StreamWriter(header=False).description(b"{x}").getvalue()
    with pytest.raises(StreamError, match="not valid JSON"):
        parse(bad_json)


@pytest.mark.fault(
    "device state of more than 64 MiB",
    direction="save",
    vm="n/a (the stream parser)",
    disk="n/a",
    exit="StreamError",
    message="'exceeds 64 MiB'",
)
def test_tail_cap() -> None:
    p = StreamParser()
    p.feed(StreamWriter().section_start(0, "timer", version_id=0, full=True).getvalue())
    with pytest.raises(StreamError, match="exceeds 64 MiB"):
        for _ in range(70):
            p.feed(bytes(1 << 20))


def test_parser_refuses_use_after_close() -> None:
    p = StreamParser()
    p.feed(ram_stream())
    p.close()
    with pytest.raises(StreamError, match="already closed"):
        p.feed(b"")


# --- fresh streams from real QEMUs ------------------------------------------------------

MIB = 1 << 20


def make_stream(
    qemu: str,
    workdir: Path,
    out: Path,
    *,
    machine: str = "pc",
    mem_mib: int = 32,
    ram: str = "zero",
    device_state: bool = False,
    capabilities: dict[str, bool] | None = None,
    extra_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Save a paused VM to `out`; returns what QEMU reports about it (the sidecar)."""
    from qemuvm import VM, make_ram_file, qemu_version

    ram_file = workdir / f"{out.name}.ram"
    make_ram_file(ram_file, mem_mib, random=ram == "random")
    with VM(
        qemu,
        workdir,
        name=out.name,
        machine=machine,
        mem_mib=mem_mib,
        ram_file=ram_file,
        paused=True,
        extra_args=extra_args,
    ) as vm:
        hmp = vm.cmd("human-monitor-command", {"command-line": "info ramblock"})
        machine_type = next(
            m["name"] for m in vm.cmd("query-machines") if m.get("alias") == machine
        )
        if device_state:
            vm.cmd("xen-save-devices-state", {"filename": str(out), "live": False})
        else:
            vm.migrate(f"exec:cat > {shlex.quote(str(out))}", capabilities=capabilities)
            info = vm.wait_migration(timeout=120)
            assert info["status"] == "completed", info
    return {
        "qemu": qemu_version(qemu),
        "kind": "device-state" if device_state else "migration",
        "machine_type": machine_type,
        "ramblocks": {} if device_state else ramblocks_from_hmp(hmp),
    }


@pytest.mark.qemu
@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_fresh_stream(qemu: str, machine: str, tmp_path: Path) -> None:
    out = tmp_path / "stream"
    meta = make_stream(qemu, tmp_path, out, machine=machine, mem_mib=64, ram="random")
    data = out.read_bytes()
    res = parse(data, fixed(8 << 20))
    p = res.parser
    assert p.complete
    (conf,) = res.of(Configuration)
    assert conf.machine_type == meta["machine_type"]
    stats = p.ram_blocks
    assert {n: s.used_length for n, s in stats.items()} == meta["ramblocks"]
    assert stats["mem"].normal_pages == 64 * MIB // 4096  # random RAM: every page sent
    (desc,) = res.of(VMDescription)
    listed = [(d["name"], d["instance_id"]) for d in desc.json["devices"]]
    assert [(d.idstr, d.instance_id) for d in res.of(DeviceSection)] == listed
    check_layout(res, data)
    assert parse(data, random_sizes(3, 1, 1 << 16)).events == res.events
    if meta["qemu"].startswith("10."):
        assert [c.name for c in res.of(Command)] == ["SWITCHOVER_START"]


@pytest.mark.qemu
def test_fresh_device_state(qemu: str, tmp_path: Path) -> None:
    out = tmp_path / "devstate"
    make_stream(qemu, tmp_path, out, device_state=True)
    data = out.read_bytes()
    res = parse(data, random_sizes(1, 1, 7))
    assert res.parser.complete and res.parser.eof_offset == len(data) - 1
    assert res.of(DeviceSection)[-1].idstr == "globalstate"
    assert not res.of(VMDescription)


@pytest.mark.qemu
def test_fresh_ignore_shared(qemu: str, tmp_path: Path) -> None:
    # The harness's RAM is share=on: with x-ignore-shared QEMU lists it (with its
    # address) but sends none of its pages.
    out = tmp_path / "shared"
    make_stream(qemu, tmp_path, out, capabilities={"x-ignore-shared": True})
    res = parse(out.read_bytes())
    (conf,) = res.of(Configuration)
    assert "x-ignore-shared" in conf.capabilities
    mem = res.parser.ram_blocks["mem"]
    assert mem.normal_pages == mem.zero_pages == 0
    assert res.parser.complete


# --- fixture generation -------------------------------------------------------------------

_GENERATE: list[tuple[str, str, dict[str, Any]]] = [
    ("qemu7.2-pc", "7.2", {"machine": "pc"}),
    ("qemu7.2-q35", "7.2", {"machine": "q35"}),
    ("qemu7.2-devstate", "7.2", {"device_state": True}),
    ("qemu7.2-ignore-shared", "7.2", {"capabilities": {"x-ignore-shared": True}}),
    ("qemu10.0-pc", "10.0", {"machine": "pc"}),
    ("qemu10.0-q35", "10.0", {"machine": "q35"}),
    ("qemu10.0-devstate", "10.0", {"device_state": True}),
]


def _generate(dest: Path) -> None:
    import tempfile

    from qemuvm import find_qemus

    qemus = find_qemus()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, version, kw in _GENERATE:
            out = Path(tmp) / name
            meta = make_stream(qemus[version], Path(tmp), out, **kw)
            data = out.read_bytes()
            res = parse(data)
            meta["devices"] = [d.idstr for d in res.of(DeviceSection)]
            (dest / f"{name}.bin.gz").write_bytes(gzip.compress(data, 9, mtime=0))
            (dest / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
            print(name, len(data), "bytes")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _generate(Path(sys.argv[1]))
