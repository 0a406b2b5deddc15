"""Helpers shared by the test modules (no test module imports another).

* the ``vmtransport`` console script of the venv running the tests, and its one-line
  errors;
* the real QEMU 7.2 and 10.0 streams of tests/data and the VM description found in a
  stream by hand;
* the vmtransport image header, parsed with ``struct`` by docs/image-format.md,
  independently of ``vmtransport``'s own decoder;
* the save of a real VM that test_qemu_images.py, test_inspect.py and
  test_libvirt_restore.py share (the ``saved`` fixture of conftest.py), destinations
  that load an image, and the damage done to images.
"""

from __future__ import annotations

import gzip
import json
import os
import shlex
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import xxhash
from qemuvm import VM, VMError, make_ram_file

import vmtransport
from vmtransport.testing import cached_bytes

VMT = Path(sys.executable).parent / "vmtransport"
DATA = Path(__file__).parent / "data"
TIMEOUT = 60
HEADER_SIZE = 65536
MEM_MIB = 64
PAGE = 4096


# --- the command ----------------------------------------------------------------------


def vmt(
    *args: str, input: bytes | None = None, stdin: Any = None
) -> subprocess.CompletedProcess[bytes]:
    """Run the real console script."""
    return subprocess.run(
        [str(VMT), *args],
        input=input,
        stdin=stdin,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )


def one_error_line(stderr: bytes | str) -> str:
    """The text of the one ``vmtransport: error: ...`` line stderr must consist of."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("vmtransport: error: "), text
    assert "Traceback" not in text
    return lines[0]


# --- real QEMU streams ----------------------------------------------------------------


def load_stream(name: str) -> tuple[bytes, dict[str, Any]]:
    """A real QEMU stream from tests/data, and what QEMU said about the VM."""
    data = gzip.decompress((DATA / f"{name}.bin.gz").read_bytes())
    meta = json.loads((DATA / f"{name}.json").read_text())
    return data, meta


def description_at_end(stream: bytes) -> tuple[int, dict[str, Any]]:
    """(offset of QEMU's EOF byte, VM description) found by hand: the stream ends with
    0x00 EOF, 0x06, be32 length, JSON; JSON holds no 0x06 byte, so the last 0x06 is it."""
    q = stream.rfind(b"\x06")
    assert q > 0 and stream[q - 1] == 0, "no EOF + VM description at the end"
    (length,) = struct.unpack_from(">I", stream, q + 1)
    assert q + 5 + length == len(stream), "VM description length does not reach the end"
    desc = json.loads(stream[q + 5 :])
    assert isinstance(desc, dict)
    return q - 1, desc


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- the image header -----------------------------------------------------------------


@dataclass
class ImageFields:
    """The header fields, by docs/image-format.md (little-endian)."""

    magic: bytes
    format_version: int
    header_size: int
    state: int
    payload_kind: int
    payload_offset: int
    payload_length: int
    checksum_algorithm: int
    metadata_length: int
    checksum: bytes
    eof_offset: int
    header_crc32: int
    crc_ok: bool
    reserved: bytes
    metadata: dict[str, Any]
    padding: bytes


def parse_header(head: bytes) -> ImageFields:
    assert len(head) >= HEADER_SIZE
    head = head[:HEADER_SIZE]
    magic = head[0:8]
    version, hsize, state, kind = struct.unpack_from("<IIII", head, 8)
    poff, plen = struct.unpack_from("<QQ", head, 24)
    algo, mlen = struct.unpack_from("<II", head, 40)
    checksum = head[48:64]
    (eof,) = struct.unpack_from("<Q", head, 64)
    (crc,) = struct.unpack_from("<I", head, 72)
    crc_ok = zlib.crc32(head[:72] + bytes(4) + head[76:]) == crc
    meta = json.loads(head[128 : 128 + mlen]) if 0 < mlen <= HEADER_SIZE - 128 else None
    return ImageFields(
        magic, version, hsize, state, kind, poff, plen, algo, mlen, checksum, eof, crc,
        crc_ok, head[76:128], meta if isinstance(meta, dict) else {}, head[128 + mlen :],
    )  # fmt: skip


def check_complete_image(path: Path, stream: bytes, offset: int = 0) -> ImageFields:
    """Assert every field of the image at ``path`` (from ``offset``) holding ``stream``."""
    raw = path.read_bytes()[offset:]
    h = parse_header(raw)
    assert h.magic == b"VMTIMAGE"
    assert h.format_version == 1
    assert h.header_size == HEADER_SIZE
    assert h.state == 1, "not marked complete"
    assert h.payload_kind == 1
    assert h.payload_offset == HEADER_SIZE
    assert h.payload_length == len(raw) - HEADER_SIZE == len(stream)
    assert raw[HEADER_SIZE:] == stream, "the payload is not QEMU's stream byte for byte"
    assert h.checksum_algorithm == 1
    assert h.checksum == xxhash.xxh3_128(stream).digest()
    eof, _ = description_at_end(stream)
    assert h.eof_offset == eof and stream[h.eof_offset] == 0
    assert h.crc_ok, "header CRC32 does not match"
    assert h.reserved == bytes(52)
    assert 0 < h.metadata_length <= HEADER_SIZE - 128
    assert h.padding == bytes(len(h.padding))
    assert set(h.metadata) >= {"name", "created", "vmtransport_version", "stream"}
    assert h.metadata["vmtransport_version"] == vmtransport.__version__
    created = datetime.strptime(h.metadata["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - created).total_seconds()) < 3600
    return h


# --- the shared save of a real VM -----------------------------------------------------


@dataclass(frozen=True)
class Saved:
    """A fresh VM's save, once per QEMU version and session: its source (64 MiB of random
    RAM, started with -S) migrated once to three targets: ``tee`` copies QEMU's bytes to a
    plain file (what ``exec:cat > FILE`` writes), to a ``file:...,format=raw`` save and to
    an ``odirect:`` image save named ``web1``."""

    version: str
    qemu: str
    dir: Path
    src_ram: Path
    image: Path  #: odirect: image, --name web1
    cat: Path  #: QEMU's bytes, as exec:cat > FILE writes them
    raw: Path  #: file:...,format=raw
    machine: str  #: the machine type "pc" stands for (query-machines)
    ramblocks: dict[str, int]  #: HMP info ramblock: name -> used length
    memdev_size: int  #: query-memdev: the main RAM backend's size
    main_block: str  #: its RAM block name (the backend's id)
    cached_after_save: tuple[int, int]  #: the image's page-cache residency, right after


def ramblocks_from_hmp(text: str) -> dict[str, int]:
    """HMP ``info ramblock``: Block Name, PSize, Offset, Used, Total (10.0 adds HVA, RO)."""
    lines = text.strip().splitlines()
    assert lines[0].split()[:2] == ["Block", "Name"], text
    out = {}
    for line in lines[1:]:
        cols = line.split()
        hexes = [c for c in cols if c.startswith("0x")]
        out[cols[0]] = int(hexes[1], 16)  # offset, used, total, ...
    return out


def wait_for(paths: list[Path], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"{paths} did not appear"
        time.sleep(0.05)


def save_vm(version: str, qemu: str, factory: pytest.TempPathFactory) -> Saved:
    """Save a fresh VM of QEMU ``version`` (see :class:`Saved`)."""
    d = factory.mktemp(f"saved-qemu{version}")
    src_ram = d / "src.ram"
    make_ram_file(src_ram, MEM_MIB, random=True)
    image, cat, raw, fifo = d / "vm.img", d / "vm.cat", d / "vm.raw", d / "fifo"
    img_err, raw_err = d / "img.err", d / "raw.err"
    os.mkfifo(fifo)
    v = shlex.quote(str(VMT))
    cmd = (
        f"{v} save file:{raw},format=raw <{fifo} 2>{raw_err} & "
        f"tee {fifo} {cat} | {v} save odirect:{image} --name web1 2>{img_err}; wait"
    )
    with VM(qemu, d, name="src", mem_mib=MEM_MIB, ram_file=src_ram, paused=True) as vm:
        hmp = vm.cmd("human-monitor-command", {"command-line": "info ramblock"})
        memdevs = vm.cmd("query-memdev")
        machines = vm.cmd("query-machines")
        vm.migrate("exec:" + cmd)
        info = vm.wait_migration(timeout=120)
        assert info["status"] == "completed", (info, vm.log())
        assert vm.status() == "postmigrate"
    wait_for([image, raw])
    cached = cached_bytes(image)
    assert img_err.read_text() == "" and raw_err.read_text() == ""
    assert len(memdevs) == 1
    (machine,) = [m["name"] for m in machines if m.get("alias") == "pc"]
    return Saved(
        version=version,
        qemu=qemu,
        dir=d,
        src_ram=src_ram,
        image=image,
        cat=cat,
        raw=raw,
        machine=machine,
        ramblocks=ramblocks_from_hmp(str(hmp)),
        memdev_size=int(memdevs[0]["size"]),
        main_block=str(memdevs[0]["id"]),
        cached_after_save=cached,
    )


def restore_cmd(uri: str, err: Path) -> str:
    return f"exec:{shlex.quote(str(VMT))} restore {shlex.quote(uri)} 2>{err}"


def load(qemu: str, tmp: Path, incoming: str, name: str = "dst") -> Path:
    """Start a destination; it must load and end in prelaunch. Returns its RAM file."""
    dst_ram = tmp / f"{name}.ram"
    dst_ram.unlink(missing_ok=True)
    make_ram_file(dst_ram, MEM_MIB, random=False)
    with VM(qemu, tmp, name=name, mem_mib=MEM_MIB, ram_file=dst_ram, incoming=incoming) as vm:
        assert vm.wait_incoming(timeout=60) == "prelaunch", vm.log()
    return dst_ram


def failed_load(qemu: str, tmp: Path, incoming: str) -> str:
    """Start a destination whose load must fail: QEMU exits with status 1."""
    dst_ram = tmp / "dst.ram"
    dst_ram.unlink(missing_ok=True)
    make_ram_file(dst_ram, MEM_MIB, random=False)
    with VM(qemu, tmp, name="dst", mem_mib=MEM_MIB, ram_file=dst_ram, incoming=incoming) as vm:
        with pytest.raises(VMError) as failure:
            status = vm.wait_incoming(timeout=60)
            pytest.fail(f"the destination loaded the damaged image (status {status})")
        assert vm.returncode == 1, str(failure.value)
    assert "exit status 1" in str(failure.value)
    return str(failure.value)


def damage(saved: Saved, how: str, path: Path) -> None:
    """Write a copy of the saved image to ``path``, damaged as ``how`` says."""
    data = bytearray(saved.image.read_bytes())
    h = parse_header(bytes(data[:HEADER_SIZE]))
    if how == "payload-flip":
        # A byte of the guest's RAM (the page at 32 MiB, whole pages are unique) in the
        # middle of the payload: only the checksum can tell (a flipped page header would
        # trip the stream parser instead).
        with open(saved.src_ram, "rb") as f:
            f.seek(MEM_MIB << 19)
            page = f.read(4096)
        # The same bytes can also start 1 or 2 bytes into another page's record (the
        # random RAM is a seed rotated per 16 MiB: a page's content shifted by a byte),
        # when the flags byte before that record's data equals the page's first byte
        # (1 time in 256): take the match its own record header announces.
        name = saved.main_block.encode()

        def announced(at: int) -> bool:
            if data[at - 1 - len(name) : at] == bytes([len(name)]) + name:
                at -= 1 + len(name)  # the first page of a section names its block
            return int.from_bytes(data[at - 8 : at], "big") & ~0xFFF == MEM_MIB << 19

        hits, at = [], data.find(page, HEADER_SIZE)
        while at >= 0:
            hits.append(at)
            at = data.find(page, at + 1)
        (at,) = [h for h in hits if announced(h)]
        assert abs(at - len(data) // 2) < len(data) // 10
        data[at + 100] ^= 0x40
    elif how == "truncated-mid":
        del data[HEADER_SIZE + h.payload_length // 2 :]
    elif how == "truncated-tail":
        # Inside the VM description, after QEMU's EOF marker: without the withholding,
        # QEMU would have had everything it needs to load and resume.
        del data[-10:]
        assert len(data) > HEADER_SIZE + h.eof_offset + 1
    elif how == "partial":
        data[16:20] = (0).to_bytes(4, "little")
        data[72:76] = bytes(4)
        data[72:76] = zlib.crc32(bytes(data[:HEADER_SIZE])).to_bytes(4, "little")
        assert parse_header(bytes(data[:HEADER_SIZE])).crc_ok
    elif how == "header-flip":
        data[HEADER_SIZE // 2] ^= 0x01  # metadata padding: covered by the CRC only
    else:
        raise AssertionError(how)
    path.write_bytes(data)


# --- QEMU's format, read independently: the oracle of the corruption tests ----------------


#: Rules of QEMU's format that vmtransport's parser does not enforce today, though it
#: could: a mutated stream that breaks only these is accepted (test_hostile.py has a
#: strict xfail test for each).
LAX_RAM_NAME = "the first section is not RAM"
LAX_COMMAND = "a command QEMU does not write in a precopy stream"
LAX_RAM_END = "the RAM section never ends"
LAX_WORD = "a RAM EOS or MULTIFD_FLUSH word with offset bits"
LAX_MACHINE = "an empty machine type"
LAX_SPOTS = (LAX_RAM_NAME, LAX_COMMAND, LAX_RAM_END, LAX_WORD, LAX_MACHINE)
#: How violations in the device state, EOF or VM description start: a reader buffers
#: that tail and checks it last.
TAIL = "after RAM: "


def stream_violation(data: bytes) -> str | None:
    """The first rule of QEMU's format (as QEMU 7.2 and 10.0 write a paused VM's precopy
    stream, a device-state file, or vmtransport.testing a synthetic one) that ``data``
    breaks; None if it breaks none. Written from the format, not from vmtransport's parser,
    whose verdicts it checks: but for the device sections' extents, which it takes from
    the parser's DeviceSection events and checks against the bytes."""
    try:
        return _violation(data)
    except (IndexError, KeyError, ValueError, UnicodeDecodeError) as exc:
        return f"malformed ({exc!r})"


def _violation(data: bytes) -> str | None:
    import vmtransport
    from vmtransport.stream import DeviceSection, StreamParser

    def be32(p: int) -> int:
        return int.from_bytes(data[p : p + 4], "big")

    def be64(p: int) -> int:
        return int.from_bytes(data[p : p + 8], "big")

    def name_at(p: int) -> str:
        raw = data[p + 1 : p + 1 + data[p]]
        if not raw or len(raw) < data[p] or not all(0x20 <= c < 0x7F for c in raw):
            raise ValueError(f"bad name {raw!r} at {p}")
        return raw.decode()

    if data[:8] != b"QEVM\0\0\0\3":
        return "header"
    p = 8
    caps: list[str] = []
    if data[p] == 0x07:
        n = be32(p + 1)
        if n == 0:
            return LAX_MACHINE
        if n > 1024 or not all(0x20 <= c < 0x7F for c in data[p + 5 : p + 5 + n]):
            return "machine type"
        p += 5 + n
        while data[p] == 0x05:
            sub = name_at(p + 1)
            p += 2 + len(sub) + 4
            if sub == "configuration/target-page-bits":
                if be32(p) != 12:
                    return "target page bits"
                p += 4
            elif sub == "configuration/capabilities":
                count, p = be32(p), p + 4
                for _ in range(count):
                    caps.append(name_at(p))
                    p += 1 + len(caps[-1])
            elif sub == "configuration/uuid":
                p += 16
            else:
                return f"configuration subsection {sub}"
    blocks: dict[str, int] = {}
    ram_id = -1
    ended = False
    used = -1
    while data[p] not in (0x00, 0x04):  # EOF, or device state: the tail
        kind, sid = data[p], be32(p + 1)
        if kind == 0x08:  # only SWITCHOVER_START (10.0), which has no data
            if data[p + 1 : p + 5] != b"\0\x0b\0\0":
                return LAX_COMMAND
            p += 5
            continue
        if kind == 0x01:
            name_at(p + 5)  # any section's idstr is printable
            if data[p + 5 : p + 13] != b"\x03ram\0\0\0\0" or ram_id >= 0:
                return LAX_RAM_NAME  # not instance 0 of "ram", or a second one
            if be32(p + 13) != 4:
                return "RAM section version"
            ram_id, p = sid, p + 17
            word, p = be64(p), p + 8
            if word & 0xFFF != 0x04:
                return "RAM setup"
            remaining = word - 0x04
            while remaining > 0:
                name = name_at(p)
                used = be64(p + 1 + len(name))
                if name in blocks or used % PAGE or not 0 < used <= remaining:
                    return f"RAM block {name}"
                blocks[name] = used
                remaining -= used
                p += 1 + len(name) + 8 + (8 if "x-ignore-shared" in caps else 0)
            used = -1
            if be64(p) != 0x10:  # EOS
                return LAX_WORD if be64(p) & 0xFFF == 0x10 else "RAM setup's end"
            p += 8
        elif kind in (0x02, 0x03) and sid == ram_id and not ended:
            ended = kind == 0x03
            p += 5
            while (word := be64(p)) & 0xFFF != 0x10:
                flags, offset = word & 0xFFF, word & ~0xFFF
                if flags == 0x200:  # MULTIFD_FLUSH
                    if offset:
                        return LAX_WORD
                    p += 8
                    continue
                if flags & ~0x20 not in (0x02, 0x08):
                    return f"RAM flags {flags:#x}"
                p += 8
                if not flags & 0x20:
                    name = name_at(p)
                    if name not in blocks:
                        return f"RAM block {name} unknown"
                    used = blocks[name]
                    p += 1 + len(name)
                if used < 0 or offset >= used:
                    return "RAM page offset"
                if flags & 0x08:
                    p += PAGE
                elif data[p] != 0:
                    return "zero page fill"
                else:
                    p += 1
            if word != 0x10:
                return LAX_WORD
            p += 8
        else:
            return f"section type {kind:#x}"
        if data[p : p + 5] != b"\x7e" + sid.to_bytes(4, "big"):
            return "section footer"
        p += 5
    if ram_id >= 0 and not ended:
        return LAX_RAM_END
    # The tail: device sections, EOF, VM description; a reader checks the first device
    # section's idstr as it meets it, the rest at the end.
    if data[p] == 0x04:
        name_at(p + 5)
    parser = StreamParser(require_description=False)  # checked below, as QEMU's format has it
    try:
        events = parser.feed(data) + parser.close()
    except vmtransport.StreamError as exc:
        return f"{TAIL}vmtransport's parser: {exc}"
    devices = [e for e in events if isinstance(e, DeviceSection)]
    eof = parser.eof_offset
    if eof is None or data[eof] != 0:
        return TAIL + "EOF"
    for d in devices:
        if d.offset != p or data[p] != 0x04 or be32(p + 1) != d.section_id:
            return f"{TAIL}device section {d.idstr} header"
        if name_at(p + 5) != d.idstr or be32(p + 6 + len(d.idstr)) != d.instance_id:
            return f"{TAIL}device section {d.idstr} name"
        p += 14 + len(d.idstr) + d.size
        if data[p : p + 5] != b"\x7e" + d.section_id.to_bytes(4, "big"):
            return f"{TAIL}device section {d.idstr} footer"
        p += 5
    if p != eof:
        return TAIL + "device state before EOF"
    if eof + 1 == len(data):
        return None  # no VM description: some machines suppress it
    if data[eof + 1] != 0x06 or be32(eof + 2) != len(data) - eof - 6:
        return TAIL + "VM description"
    try:
        listed = [(d["name"], d["instance_id"]) for d in json.loads(data[eof + 6 :])["devices"]]
    except (ValueError, KeyError, TypeError):
        return TAIL + "VM description's JSON"
    if listed != [(d.idstr, d.instance_id) for d in devices]:
        return TAIL + "devices not as described"
    return None


def refused_unless_valid(data: bytes, error: Exception | None) -> None:
    """A mutated stream is refused with a StreamError, unless it still is a valid stream
    by QEMU's rules (every change was to what a stream's structure cannot check: a page's
    content, a device's state, whole page records...), or it breaks only a rule the
    parser is known to be lax about (LAX_SPOTS)."""
    if error is None:
        violation = stream_violation(data)
        assert violation is None or violation in LAX_SPOTS, f"accepted, but: {violation}"
    else:
        assert isinstance(error, vmtransport.StreamError), repr(error)
        assert str(error) and "\n" not in str(error), repr(error)


# --- structural bytes of a real stream: where a flip can change how QEMU reads it ------


@dataclass(frozen=True)
class Spot:
    """A byte of a stream whose meaning to QEMU is structure, not content."""

    at: int  #: offset in the stream
    what: str  #: e.g. "sec3-type", "ram-setup/block0-len"
    section_type: bool = False  #: QEMU reads it as a section type (0x00 would be its EOF)


def stream_spots(data: bytes) -> list[Spot]:
    """The structural bytes of a complete precopy stream (QEMU 7.2 or 10.0, a paused VM,
    with its VM description), found by walking it by QEMU's format: header,
    configuration, every RAM section's start and footer, the RAM setup, page headers at
    the first, middle and last page of the first pass and before EOS words, every EOS
    word, the END section's pages (a paused VM's has none), every device section's type
    byte and a sample of their headers, state bytes and footers (the sections are
    delimited by the VM description's device list and their footers), EOF and the VM
    description. Written from the format, not from vmtransport's parser. Deduplicated,
    in stream order."""
    spots: dict[int, Spot] = {}

    def add(at: int, what: str, section_type: bool = False) -> None:
        assert 0 <= at < len(data), (at, what)
        spots.setdefault(at, Spot(at, what, section_type))

    def be32(p: int) -> int:
        return int.from_bytes(data[p : p + 4], "big")

    def be64(p: int) -> int:
        return int.from_bytes(data[p : p + 8], "big")

    assert data[:8] == b"QEVM\0\0\0\3"
    add(0, "stream-magic")
    add(7, "stream-version")
    p = 8
    assert data[p] == 0x07, "no configuration section"
    add(p, "config-type", True)
    add(p + 4, "config-name-len")
    add(p + 5, "config-name")
    p += 5 + be32(p + 1)
    while data[p] == 0x05:  # subsections: name, version, then fields we know
        sub = data[p + 2 : p + 2 + data[p + 1]].decode()
        p += 2 + len(sub) + 4
        if sub == "configuration/target-page-bits":
            p += 4
        elif sub == "configuration/capabilities":
            count, p = be32(p), p + 4
            for _ in range(count):
                p += 1 + data[p]
        elif sub == "configuration/uuid":
            p += 16
        else:
            raise AssertionError(f"configuration subsection {sub}")

    def start_header(p: int, tag: str) -> int:
        """A SECTION_START or FULL header at ``p``; returns where its data starts."""
        n = data[p + 5]
        add(p, f"{tag}-type", True)
        add(p + 4, f"{tag}-id")
        add(p + 5, f"{tag}-idstr-len")
        add(p + 6 + n // 2, f"{tag}-idstr")
        add(p + 6 + n + 3, f"{tag}-instance")
        add(p + 6 + n + 7, f"{tag}-version")
        return p + 6 + n + 8

    def footer(p: int, sid: int, tag: str, full: bool = True) -> int:
        assert data[p : p + 5] == b"\x7e" + sid.to_bytes(4, "big"), (tag, p)
        add(p, f"{tag}-footer")
        if full:
            add(p + 4, f"{tag}-footer-id")
        return p + 5

    blocks: dict[str, int] = {}
    used = -1  # the last page's block: CONTINUE pages carry it across sections
    ram_id = -1
    ended = False
    passes: list[list[tuple[int, str]]] = []  # per PART/END section: (page word, tag)
    eos: list[tuple[int, str]] = []
    parts: list[tuple[int, int, str]] = []  # PART/END sections: (start, footer, tag)
    nsec = 0
    while data[p] not in (0x00, 0x04):
        kind, sid = data[p], be32(p + 1)
        tag = f"sec{nsec}"
        nsec += 1
        if kind == 0x08:  # a command: SWITCHOVER_START (10.0)
            add(p, f"{tag}-command-type", True)
            add(p + 2, f"{tag}-command")
            p += 5 + be32(p + 3) if data[p + 1 : p + 3] != b"\0\x0b" else 5
            continue
        if kind == 0x01:
            assert data[p + 5 : p + 9] == b"\x03ram" and ram_id < 0
            ram_id, tag = sid, f"{tag}-ram-start"
            p = start_header(p, tag)
            word = be64(p)
            assert word & 0xFFF == 0x04, "no MEM_SIZE"
            add(p + 7, "ram-setup/mem-size-flags")
            add(p + 4, "ram-setup/mem-size")
            p += 8
            remaining, i = word & ~0xFFF, 0
            while remaining > 0:
                n = data[p]
                name = data[p + 1 : p + 1 + n].decode()
                used = be64(p + 1 + n)
                if i == 0:
                    add(p + 1 + n // 2, "ram-setup/block0-name")
                    add(p + 1 + n + 5, "ram-setup/block0-length")
                if i < 2:
                    add(p, f"ram-setup/block{i}-name-len")
                blocks[name] = used
                remaining -= used
                p += 1 + n + 8
                i += 1
            assert be64(p) == 0x10
            eos.append((p, f"{tag}-eos"))
            p += 8
        elif kind in (0x02, 0x03) and sid == ram_id and not ended:
            ended = kind == 0x03
            tag = f"{tag}-ram-{'end' if ended else 'part'}"
            add(p, f"{tag}-type", True)
            start = p
            p += 5
            pages: list[tuple[int, str]] = []
            while (word := be64(p)) & 0xFFF != 0x10:
                flags = word & 0xFFF
                if flags == 0x200:  # MULTIFD_FLUSH
                    add(p + 6, f"{tag}-multifd-flush")
                    p += 8
                    continue
                assert flags & ~0x20 in (0x02, 0x08), f"RAM flags {flags:#x} at {p}"
                pages.append((p, tag))
                q = p + 8
                if not flags & 0x20:
                    used = blocks[data[q + 1 : q + 1 + data[q]].decode()]
                    q += 1 + data[q]
                assert (word & ~0xFFF) < used
                p = q + (PAGE if flags & 0x08 else 1)
            assert word == 0x10
            passes.append(pages)
            eos.append((p, f"{tag}-eos"))
            p += 8
            parts.append((start, p, tag))
            p = footer(p, sid, tag, full=False)
            continue
        else:
            raise AssertionError(f"section type {kind:#x} at {p} before the device state")
        p = footer(p, sid, tag)
    assert ram_id >= 0 and ended, "the RAM section never ended"
    # Every PART/END section's type byte, EOS word and footer; its id and its footer's
    # at the first and last PART and at END.
    for start, foot, tag in parts[:1] + parts[-2:]:
        add(start + 4, f"{tag}-id")
        add(foot + 4, f"{tag}-footer-id")

    # Page headers: flags and an offset byte; a block name where the page has one.
    def page(at: int, tag: str) -> None:
        add(at + 7, f"{tag}-flags")
        add(at + 5, f"{tag}-offset")
        if not data[at + 7] & 0x20:
            add(at + 8, f"{tag}-block-len")
            add(at + 9, f"{tag}-block-name")

    first_pass = [pg for sec in passes[:-1] for pg in sec]
    for k, (at, tag) in enumerate(
        [first_pass[0], first_pass[len(first_pass) // 2], first_pass[-1]]
    ):
        page(at, f"{tag}/page-{('first', 'middle', 'last')[k]}")
    for sec in passes:  # the last page before each EOS (a sample: every 4th section)
        if sec and (sec is passes[-1] or passes.index(sec) % 4 == 0):
            page(sec[-1][0], f"{sec[-1][1]}/page-before-eos")
    end_pages = passes[-1]
    for at, tag in end_pages[:1] + end_pages[-1:]:
        page(at, f"{tag}/page")
    for k, (at, tag) in enumerate(eos):
        add(at + 7, f"{tag}-flags")
        if k in (0, 1, len(eos) - 1):
            add(at + 6, f"{tag}-offset")

    # The device state: its sections, in the VM description's order, each ending at
    # the first footer of its id that the next section's header (or EOF) follows.
    eof, desc = description_at_end(data)
    devices = [(d["name"], d["instance_id"]) for d in desc["devices"]]
    # Every section's type byte; the rest of the header and the footer's id at the
    # first, middle and last section; a byte of the state and the footer at those and
    # every eighth.
    detail = {0, len(devices) // 2, len(devices) - 1}
    for k, (name, inst) in enumerate(devices):
        assert data[p] == 0x04, f"device section {name} at {p}"
        sid = be32(p + 1)
        assert (
            data[p + 6 : p + 6 + data[p + 5]] == name.encode() and be32(p + 6 + len(name)) == inst
        ), (name, p)
        tag = f"dev{k}-{name.rsplit('/', 1)[-1]}"
        body = start_header(p, tag) if k in detail else p + 14 + len(name)
        add(p, f"{tag}-type", True)
        if k + 1 < len(devices):
            nxt = devices[k + 1][0].encode()
            follow = bytes([len(nxt)]) + nxt
            mark = b"\x7e" + sid.to_bytes(4, "big")
            q = data.index(mark, body)
            while not (data[q + 5] == 0x04 and data[q + 10 : q + 11 + len(nxt)] == follow):
                q = data.index(mark, q + 1)
        else:
            q = eof - 5
        assert data[q : q + 5] == b"\x7e" + sid.to_bytes(4, "big")
        if k in detail:
            footer(q, sid, tag)
        if q > body and (k in detail or k % 8 == 4):
            add(body + (q - body) // 2, f"{tag}-state")
            add(q, f"{tag}-footer")
        p = q + 5
    assert p == eof, (p, eof)
    add(eof, "eof", True)
    add(eof + 1, "vmdesc-type", True)
    add(eof + 2, "vmdesc-len-high")
    add(eof + 5, "vmdesc-len-low")
    add(eof + 6 + (len(data) - eof - 6) // 2, "vmdesc-json")
    add(len(data) - 1, "last-byte")
    return sorted(spots.values(), key=lambda s: s.at)
