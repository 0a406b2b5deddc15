"""Synthetic QEMU migration streams for tests: element by element, or whole and valid.

The layout follows QEMU's ``migration/savevm.c`` and ``migration/ram.c`` (big-endian
throughout; vmtransport.stream reads the same grammar):

    header         "QEVM", be32 3
    configuration  0x07, be32 len, machine type [, subsections 0x05 ...]
    RAM START      0x01, be32 id, u8 3 "ram", be32 0, be32 4; be64 total | MEM_SIZE,
                   per block u8 len, name, be64 used_length; be64 EOS; footer
    RAM PART       0x02, be32 id; page records; be64 EOS; footer
    RAM END        0x03, be32 id; be64 EOS; footer
    devices        0x04, be32 id, u8 len, idstr, be32 instance, be32 version, state; footer
    EOF            0x00
    description    0x06, be32 len, JSON {"page_size", "devices": [...]}

where a footer is 0x7e, be32 id, and a page record is be64 ``offset | flags`` (PAGE 0x08
or ZERO 0x02, CONTINUE 0x20 once a block was named), the block's u8 len + name unless
CONTINUE, then the page (4096 bytes) or a zero page's fill byte 0.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, final, overload

#: QEMU's target page size on x86, the size of every RAM page record's data.
PAGE_SIZE: Final = 4096

_MAGIC: Final = b"QEVM"
_VERSION: Final = 3
# Section types (QEMU_VM_*)
_EOF: Final = 0x00
_START: Final = 0x01
_PART: Final = 0x02
_END: Final = 0x03
_FULL: Final = 0x04
_SUBSECTION: Final = 0x05
_VMDESCRIPTION: Final = 0x06
_CONFIGURATION: Final = 0x07
_COMMAND: Final = 0x08
_FOOTER: Final = 0x7E
# RAM flags (RAM_SAVE_FLAG_*)
_ZERO: Final = 0x02
_MEM_SIZE: Final = 0x04
_PAGE: Final = 0x08
_EOS: Final = 0x10
_CONTINUE: Final = 0x20
_XBZRLE: Final = 0x40
_RAM_VERSION: Final = 4
_SWITCHOVER_START: Final = 11
_RAM_SECTION_ID: Final = 2

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


# --- element encoders (the one place that knows the byte layout) ---------------------------


def _name(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return bytes((len(raw),)) + raw


def _section_header(
    kind: int, section_id: int, idstr: str, instance_id: int, version_id: int
) -> bytes:
    return (
        bytes((kind,))
        + _BE32.pack(section_id)
        + _name(idstr)
        + struct.pack(">II", instance_id, version_id)
    )


def _footer(section_id: int) -> bytes:
    return bytes((_FOOTER,)) + _BE32.pack(section_id)


def _block_list(blocks: Sequence[tuple[str, int]], extra: Callable[[str], bytes] | None) -> bytes:
    out = [_BE64.pack(sum(used for _, used in blocks) | _MEM_SIZE)]
    for name, used in blocks:
        out.append(_name(name) + _BE64.pack(used))
        if extra is not None:
            out.append(extra(name))
    return b"".join(out)


def _record(offset: int, flags: int, block: str | None) -> bytes:
    """A RAM record's header: the be64 word, and the block's name unless it continues."""
    if block is None:
        return _BE64.pack(offset | flags | _CONTINUE)
    return _BE64.pack(offset | flags) + _name(block)


def _description(devices: Sequence[Device], page_size: int) -> dict[str, Any]:
    return {
        "page_size": page_size,
        "devices": [
            {
                "name": d.idstr,
                "instance_id": d.instance_id,
                "vmsd_name": d.idstr,
                "version": d.version_id,
                "fields": [],
            }
            for d in devices
        ],
    }


def _described(desc: Mapping[str, Any] | bytes) -> bytes:
    raw = desc if isinstance(desc, bytes) else json.dumps(desc).encode()
    return bytes((_VMDESCRIPTION,)) + _BE32.pack(len(raw)) + raw


def _globalstate(runstate: str) -> bytes:
    """The ``globalstate`` device's state: be32 length with the NUL, a 100-byte buffer."""
    raw = runstate.encode("ascii")
    if len(raw) >= 100:
        raise ValueError(f"runstate {runstate!r} is longer than QEMU's 100-byte buffer")
    return _BE32.pack(len(raw) + 1) + raw.ljust(100, b"\0")


# --- public types ------------------------------------------------------------------------


@final
class Device(NamedTuple):
    """A device (non-RAM) section: QEMU's FULL section with the device's opaque state."""

    idstr: str
    state: bytes
    instance_id: int = 0
    version_id: int = 1


@final
class Section(NamedTuple):
    """Where one section of a stream lies: ``offset`` is its type byte, ``body`` the first
    byte after its header, ``footer`` the footer's 0x7e byte (the section ends 5 bytes
    later)."""

    kind: Literal["start", "part", "end", "full"]
    section_id: int
    idstr: str
    offset: int
    body: int
    footer: int

    @property
    def end(self) -> int:
        """The offset just after the section's footer."""
        return self.footer + 5


@final
class PageRecord(NamedTuple):
    """One RAM page record: ``header`` is its be64 word, ``data`` its page (``PAGE_SIZE``
    bytes) or, for a zero page, its fill byte."""

    number: int
    header: int
    data: int
    zero: bool
    #: The page's offset in its RAM block (the high bits of the be64 word).
    ram_offset: int

    @property
    def end(self) -> int:
        return self.data + (1 if self.zero else PAGE_SIZE)


@final
class _Pages(Sequence[PageRecord]):
    """The page records of a SyntheticStream, computed on demand (a multi-GiB stream has
    millions)."""

    def __init__(self, stream: SyntheticStream, bodies: Sequence[int]) -> None:
        self._s = stream
        self._bodies = bodies

    def __len__(self) -> int:
        return self._s.pages

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    @overload
    def __getitem__(self, i: int) -> PageRecord: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[PageRecord]: ...

    def __getitem__(self, i: int | slice) -> PageRecord | Sequence[PageRecord]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"page {i} of {n}")
        s = self._s
        part = i // s.pages_per_section
        first = part * s.pages_per_section
        zeros = s._zeros_before(i) - s._zeros_before(first)
        normals = i - first - zeros
        pos = self._bodies[part] + normals * (8 + PAGE_SIZE) + zeros * 9
        if part == 0 and i > 0:
            pos += 1 + len(s.block)  # the stream's first record named the block
        zero = s.is_zero(i)
        data = pos + 8 + (1 + len(s.block) if i == 0 else 0)
        return PageRecord(i, pos, data, zero, s.ram_offset(i))


@final
class StreamLayout(NamedTuple):
    """The structure of a SyntheticStream, by stream offset: what corruption tests aim at."""

    length: int
    #: The configuration section's type byte (right after the 8-byte header).
    configuration: int
    #: Every section in stream order: RAM START, PARTs and END, then the device sections.
    sections: tuple[Section, ...]
    #: Offsets of QEMU_VM_COMMAND elements (SWITCHOVER_START).
    commands: tuple[int, ...]
    #: The page records, in stream order.
    pages: Sequence[PageRecord]
    #: QEMU's EOF marker.
    eof: int
    #: The VM description's type byte (0x06), or None without one.
    description: int | None

    @property
    def ram_sections(self) -> tuple[Section, ...]:
        return tuple(s for s in self.sections if s.idstr == "ram")

    @property
    def device_sections(self) -> tuple[Section, ...]:
        return tuple(s for s in self.sections if s.kind == "full")


# --- element by element -------------------------------------------------------------------


@final
class StreamWriter:
    """Writes a QEMU migration stream element by element, exactly as told -- including
    what QEMU would never write (bad offsets, unknown flags, a missing footer), for tests
    of what a reader makes of it. Methods return the writer, so calls chain::

        w = StreamWriter().configuration("pc-q35-10.0")
        w.section_start(2, "ram").block_list([("pc.ram", 1 << 20)]).eos().footer(2)
        w.section_part(2).page(0, block="pc.ram").zero_page(4096).eos().footer(2)
        data = w.finish([Device("timer", bytes(24))])

    ``footers=False`` writes streams of machine types before 2.4, which have none.
    """

    def __init__(self, *, header: bool = True, footers: bool = True) -> None:
        self._out = bytearray()
        self.footers = footers
        self._next_device_id = 100
        if header:
            self.header()

    @property
    def offset(self) -> int:
        """Bytes written so far: the offset of the next element."""
        return len(self._out)

    def getvalue(self) -> bytes:
        return bytes(self._out)

    # raw values
    def raw(self, data: bytes) -> StreamWriter:
        self._out += data
        return self

    def u8(self, v: int) -> StreamWriter:
        return self.raw(bytes((v,)))

    def be16(self, v: int) -> StreamWriter:
        return self.raw(_BE16.pack(v))

    def be32(self, v: int) -> StreamWriter:
        return self.raw(_BE32.pack(v))

    def be64(self, v: int) -> StreamWriter:
        return self.raw(_BE64.pack(v))

    def name(self, s: str | bytes) -> StreamWriter:
        """A u8 length and the string (QEMU's idstrs and RAM block names)."""
        return self.raw(_name(s))

    # elements
    def header(self, version: int = _VERSION, magic: bytes = _MAGIC) -> StreamWriter:
        return self.raw(magic).be32(version)

    def configuration(self, machine: str = "pc-i440fx-7.2", *subsections: bytes) -> StreamWriter:
        """The configuration section; ``subsections`` from :meth:`subsection` and friends."""
        raw = machine.encode()
        self.u8(_CONFIGURATION).be32(len(raw)).raw(raw)
        for sub in subsections:
            self.raw(sub)
        return self

    @staticmethod
    def subsection(name: str, fields: bytes, version_id: int = 1) -> bytes:
        """A configuration subsection: 0x05, u8 len, name, be32 version_id, fields."""
        return bytes((_SUBSECTION,)) + _name(name) + _BE32.pack(version_id) + fields

    @staticmethod
    def capabilities(*names: str) -> bytes:
        """The ``configuration/capabilities`` subsection (``x-ignore-shared``...)."""
        fields = _BE32.pack(len(names)) + b"".join(_name(n) for n in names)
        return StreamWriter.subsection("configuration/capabilities", fields)

    @staticmethod
    def target_page_bits(bits: int) -> bytes:
        return StreamWriter.subsection("configuration/target-page-bits", _BE32.pack(bits))

    @staticmethod
    def uuid(uuid: bytes) -> bytes:
        return StreamWriter.subsection("configuration/uuid", uuid)

    def section_start(
        self, section_id: int, idstr: str, instance_id: int = 0, version_id: int = _RAM_VERSION,
        *, full: bool = False,
    ) -> StreamWriter:  # fmt: skip
        """A START section header (FULL with ``full=True``)."""
        kind = _FULL if full else _START
        return self.raw(_section_header(kind, section_id, idstr, instance_id, version_id))

    def section_part(self, section_id: int, *, end: bool = False) -> StreamWriter:
        """A PART section header (END with ``end=True``)."""
        return self.u8(_END if end else _PART).be32(section_id)

    def footer(self, section_id: int) -> StreamWriter:
        """A section footer; nothing when the writer writes no footers."""
        return self.raw(_footer(section_id)) if self.footers else self

    def command(self, cmd: int, data: bytes = b"") -> StreamWriter:
        """A QEMU_VM_COMMAND: be16 cmd, be16 length, data (no footer)."""
        return self.u8(_COMMAND).be16(cmd).be16(len(data)).raw(data)

    def block_list(
        self, blocks: Sequence[tuple[str, int]], extra: Callable[[str], bytes] | None = None
    ) -> StreamWriter:
        """The RAM setup: be64 total | MEM_SIZE, then name and used length per block, and
        whatever ``extra(name)`` adds after each (a page size, an address)."""
        return self.raw(_block_list(blocks, extra))

    def ram_word(self, offset: int, flags: int) -> StreamWriter:
        """A bare be64 RAM word, ``offset | flags``."""
        return self.be64(offset | flags)

    def page(
        self, offset: int, data: bytes | None = None, *, block: str | None = None,
        fill: int = 0xAB, page_size: int = PAGE_SIZE,
    ) -> StreamWriter:  # fmt: skip
        """A normal page: ``data`` or ``page_size`` bytes of ``fill``; a block name makes
        it the first page of that block, no name continues the last one."""
        self.raw(_record(offset, _PAGE, block))
        return self.raw(data if data is not None else bytes((fill,)) * page_size)

    def zero_page(self, offset: int, *, block: str | None = None, fill: int = 0) -> StreamWriter:
        """A zero page (its fill byte must be 0)."""
        return self.raw(_record(offset, _ZERO, block)).u8(fill)

    def xbzrle_page(
        self, offset: int, data: bytes, *, block: str | None = None, encoding: int = 1
    ) -> StreamWriter:
        """An XBZRLE-encoded page: u8 encoding, be16 length, the encoded data."""
        self.raw(_record(offset, _XBZRLE, block))
        return self.u8(encoding).be16(len(data)).raw(data)

    def eos(self) -> StreamWriter:
        """The RAM word that ends a RAM section's payload."""
        return self.be64(_EOS)

    def device(self, device: Device, section_id: int | None = None) -> StreamWriter:
        """A device's FULL section with its footer."""
        if section_id is None:
            section_id = self._next_device_id
            self._next_device_id += 1
        d = device
        self.raw(_section_header(_FULL, section_id, d.idstr, d.instance_id, d.version_id))
        return self.raw(d.state).footer(section_id)

    def eof(self) -> StreamWriter:
        return self.u8(_EOF)

    def description(self, desc: Mapping[str, Any] | bytes) -> StreamWriter:
        """The VM description: 0x06, be32 length, the JSON (``desc`` as given if bytes)."""
        return self.raw(_described(desc))

    def finish(
        self, devices: Sequence[Device] = (), *, description: bool = True,
        section_ids: Sequence[int] | None = None,
    ) -> bytes:  # fmt: skip
        """Write the device sections, EOF and (unless told not to) a VM description that
        lists the devices; return the whole stream."""
        ids = list(section_ids) if section_ids is not None else [None] * len(devices)
        for d, sid in zip(devices, ids, strict=True):
            self.device(d, sid)
        self.eof()
        if description:
            self.description(_description(devices, PAGE_SIZE))
        return self.getvalue()


# --- whole valid streams -----------------------------------------------------------------


_DEFAULT_DEVICES: Final = (("timer", 24, 0, 2), ("i8259", 20, 0, 1), ("i8259", 20, 1, 1))


@final
class SyntheticStream:
    """A complete, valid QEMU migration stream of a paused VM with one RAM block, made up
    on demand: what QEMU 7.2 (or 10.0, with ``switchover_start``) writes, in shape.

    ``pages`` RAM pages (or as many as make the stream exactly ``size`` bytes long: the
    remainder pads the first device's state with zeros) go in PART sections of
    ``pages_per_section`` pages; page ``i`` lands at ``i * PAGE_SIZE`` modulo ``ram_size``
    in the block. ``zero_fraction`` of them, evenly spread, are zero pages; the others
    hold random bytes from ``seed`` -- all different, or cycling through
    ``distinct_pages`` pages (cheap for multi-GiB streams). The device sections are
    ``devices`` (by default a timer, two i8259 and ``globalstate`` with ``runstate``),
    followed by EOF and, unless ``description=False``, the VM description.

    Nothing is generated until asked: :meth:`chunks` yields the stream a section at a time
    (a multi-GiB stream never sits in memory), ``bytes(stream)`` gives it whole;
    :attr:`layout` says where every part of it is. The knobs are attributes: read them,
    do not change them. A real QEMU would not load the stream (the device states are
    made up); vmtransport's parser finds it complete.
    """

    def __init__(
        self,
        pages: int | None = None,
        *,
        size: int | None = None,
        seed: int = 0,
        zero_fraction: float = 0.0,
        distinct_pages: int | None = None,
        pages_per_section: int = 256,
        ram_size: int | None = None,
        machine: str = "pc-i440fx-7.2",
        block: str = "pc.ram",
        devices: Sequence[Device] | None = None,
        runstate: str = "running",
        switchover_start: bool = False,
        description: bool = True,
    ) -> None:
        if (pages is None) == (size is None):
            raise ValueError("give either pages or size")
        if not 0 <= zero_fraction <= 1:
            raise ValueError(f"zero_fraction must be within [0, 1], not {zero_fraction}")
        if pages_per_section < 1:
            raise ValueError(f"pages_per_section must be positive, not {pages_per_section}")
        if distinct_pages is not None and distinct_pages < 1:
            raise ValueError(f"distinct_pages must be positive, not {distinct_pages}")
        self.seed = seed
        self.zero_fraction = Fraction(zero_fraction).limit_denominator(1 << 16)
        self.distinct_pages = distinct_pages
        self.pages_per_section = pages_per_section
        self.machine = machine
        self.block = block
        self.runstate = runstate
        self.switchover_start = switchover_start
        self.has_description = description
        if devices is None:
            r = random.Random(f"{seed}:devices")
            devices = [Device(n, r.randbytes(k), inst, ver) for n, k, inst, ver in _DEFAULT_DEVICES]
            devices.append(Device("globalstate", _globalstate(runstate)))
        self._devices = tuple(devices)
        self._ram_size = ram_size
        self._padding = 0
        if size is not None:
            pages = self._fit(size)
        assert pages is not None
        if pages < 0:
            raise ValueError(f"pages must not be negative, not {pages}")
        self.pages = pages
        if ram_size is not None and (ram_size <= 0 or ram_size % PAGE_SIZE):
            raise ValueError(f"ram_size must be a positive multiple of {PAGE_SIZE}")

    # --- what it holds ---------------------------------------------------------------

    @property
    def ram_size(self) -> int:
        """The RAM block's used length: ``ram_size``, or enough for every page (at least
        64 MiB, in whole MiB)."""
        if self._ram_size is not None:
            return self._ram_size
        return max(64 << 20, -(-self.pages * PAGE_SIZE >> 20) << 20)

    @property
    def devices(self) -> tuple[Device, ...]:
        """The device sections, as written (the first one padded for ``size``)."""
        if not self._padding:
            return self._devices
        first = self._devices[0]
        return (first._replace(state=first.state + bytes(self._padding)), *self._devices[1:])

    @property
    def zero_pages(self) -> int:
        return self._zeros_before(self.pages)

    @property
    def normal_pages(self) -> int:
        return self.pages - self.zero_pages

    def is_zero(self, i: int) -> bool:
        """Whether page ``i`` is a zero page."""
        return self._zeros_before(i + 1) > self._zeros_before(i)

    def ram_offset(self, i: int) -> int:
        """Page ``i``'s offset in the RAM block."""
        return i * PAGE_SIZE % self.ram_size

    def page_data(self, i: int) -> bytes:
        """The content of page ``i`` (zeros for a zero page)."""
        if not 0 <= i < self.pages:
            raise IndexError(f"page {i} of {self.pages}")
        if self.is_zero(i):
            return bytes(PAGE_SIZE)
        part = i // self.pages_per_section
        first = part * self.pages_per_section
        k = i - first - (self._zeros_before(i) - self._zeros_before(first))
        return bytes(self._contents(part)[k])

    def description_json(self) -> dict[str, Any]:
        """The VM description the stream carries (when it carries one)."""
        return _description(self.devices, PAGE_SIZE)

    def __len__(self) -> int:
        return self._length(self.pages, self._padding)

    def __repr__(self) -> str:
        return f"<SyntheticStream {self.pages} pages, {len(self)} bytes, seed {self.seed}>"

    # --- the bytes -------------------------------------------------------------------

    def chunks(self) -> Iterator[bytes]:
        """The stream in order: the head (header, configuration, RAM setup), one RAM PART
        section per chunk (about ``pages_per_section`` pages), then the tail (RAM END,
        device sections, EOF, description)."""
        yield self._head()
        for part in range(self._parts()):
            yield self._part(part)
        yield self._tail()

    def __bytes__(self) -> bytes:
        return b"".join(self.chunks())

    def to_bytes(self) -> bytes:
        return bytes(self)

    def write_to(self, path: str | Path) -> Path:
        """Write the stream to ``path`` (mode 0600 when created) a chunk at a time."""
        path = Path(path)
        with open(path, "wb", opener=lambda p, flags: os.open(p, flags, 0o600)) as f:
            for chunk in self.chunks():
                f.write(chunk)
        return path

    @cached_property
    def layout(self) -> StreamLayout:
        """Where each part of the stream is (computed, not generated)."""
        sections: list[Section] = []
        rid = _RAM_SECTION_ID
        ram_start = 8 + 5 + len(self.machine)
        setup = 17
        body = ram_start + setup
        foot = body + 8 + 1 + len(self.block) + 8 + 8
        sections.append(Section("start", rid, "ram", ram_start, body, foot))
        pos = foot + 5
        bodies = []
        for part in range(self._parts()):
            length = self._part_length(part)
            bodies.append(pos + 5)
            sections.append(Section("part", rid, "ram", pos, pos + 5, pos + length - 5))
            pos += length
        commands = []
        if self.switchover_start:
            commands.append(pos)
            pos += 5
        sections.append(Section("end", rid, "ram", pos, pos + 5, pos + 13))
        pos += 18
        for d, sid in zip(self.devices, self._device_ids(), strict=True):
            head = 14 + len(d.idstr)
            sections.append(
                Section("full", sid, d.idstr, pos, pos + head, pos + head + len(d.state))
            )
            pos += head + len(d.state) + 5
        eof = pos
        desc = eof + 1 if self.has_description else None
        return StreamLayout(
            len(self), 8, tuple(sections), tuple(commands), _Pages(self, bodies), eof, desc
        )

    # --- internals -------------------------------------------------------------------

    def _zeros_before(self, i: int) -> int:
        f = self.zero_fraction
        return i * f.numerator // f.denominator

    def _parts(self) -> int:
        return -(-self.pages // self.pages_per_section)

    def _device_ids(self) -> list[int]:
        # In registration order, as QEMU numbers them, around the RAM section's id.
        ids = [i for i in range(len(self._devices) + 1) if i != _RAM_SECTION_ID]
        return ids[: len(self._devices)]

    def _head_length(self) -> int:
        return 8 + 5 + len(self.machine) + 17 + 8 + 1 + len(self.block) + 8 + 8 + 5

    def _part_length(self, part: int, pages: int | None = None) -> int:
        n = self.pages if pages is None else pages
        first = part * self.pages_per_section
        last = min(n, first + self.pages_per_section)
        zeros = self._zeros_before(last) - self._zeros_before(first)
        length = 5 + (last - first - zeros) * (8 + PAGE_SIZE) + zeros * 9 + 8 + 5
        return length + (1 + len(self.block) if part == 0 else 0)

    def _length(self, pages: int, padding: int) -> int:
        """The stream's length with ``pages`` pages and ``padding`` bytes of padding."""
        n = pages
        full, rest = divmod(n, self.pages_per_section)
        # The parts' page records, without walking each part: all pages, plus per part
        # 18 bytes of header, EOS and footer, plus the block name once.
        zeros = self._zeros_before(n)
        ram = (n - zeros) * (8 + PAGE_SIZE) + zeros * 9
        parts = full + (1 if rest else 0)
        ram += parts * 18 + (1 + len(self.block) if parts else 0)
        tail = (5 if self.switchover_start else 0) + 18
        tail += sum(14 + len(d.idstr) + len(d.state) + 5 for d in self._devices) + padding + 1
        if self.has_description:
            desc = _description(self._devices, PAGE_SIZE)
            tail += 5 + len(json.dumps(desc).encode())
        return self._head_length() + ram + tail

    def _fit(self, size: int) -> int:
        """The most pages that fit ``size`` bytes; the rest becomes padding."""
        if not self._devices:
            raise ValueError("size needs a device section to pad")
        if self._length(0, 0) > size:
            raise ValueError(
                f"no stream is as short as {size} bytes (at least {self._length(0, 0)})"
            )
        lo, hi = 0, size // 9 + 1  # a zero page, the cheapest, costs 9 bytes
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._length(mid, 0) <= size:
                lo = mid
            else:
                hi = mid - 1
        self._padding = size - self._length(lo, 0)
        return lo

    def _contents(self, part: int) -> list[memoryview]:
        """The normal pages' contents of PART section ``part``."""
        first = part * self.pages_per_section
        last = min(self.pages, first + self.pages_per_section)
        count = (last - first) - (self._zeros_before(last) - self._zeros_before(first))
        if self.distinct_pages is None:
            data = memoryview(random.Random(f"{self.seed}:{part}").randbytes(count * PAGE_SIZE))
            return [data[k * PAGE_SIZE : (k + 1) * PAGE_SIZE] for k in range(count)]
        pool = self._pool
        start = first - self._zeros_before(first)  # normal pages before this part
        return [pool[(start + k) % len(pool)] for k in range(count)]

    @cached_property
    def _pool(self) -> list[memoryview]:
        n = self.distinct_pages or 1
        data = memoryview(random.Random(f"{self.seed}:pool").randbytes(n * PAGE_SIZE))
        return [data[k * PAGE_SIZE : (k + 1) * PAGE_SIZE] for k in range(n)]

    def _head(self) -> bytes:
        w = StreamWriter().configuration(self.machine)
        w.section_start(_RAM_SECTION_ID, "ram").block_list([(self.block, self.ram_size)])
        return w.eos().footer(_RAM_SECTION_ID).getvalue()

    def _part(self, part: int) -> bytes:
        first = part * self.pages_per_section
        last = min(self.pages, first + self.pages_per_section)
        contents = iter(self._contents(part))
        out: list[bytes | memoryview] = [bytes((_PART,)) + _BE32.pack(_RAM_SECTION_ID)]
        for i in range(first, last):
            block = self.block if i == 0 else None
            if self.is_zero(i):
                out.append(_record(self.ram_offset(i), _ZERO, block) + b"\0")
            else:
                out.append(_record(self.ram_offset(i), _PAGE, block))
                out.append(next(contents))
        out.append(_BE64.pack(_EOS) + _footer(_RAM_SECTION_ID))
        return b"".join(out)

    def _tail(self) -> bytes:
        w = StreamWriter(header=False)
        if self.switchover_start:
            w.command(_SWITCHOVER_START)
        w.section_part(_RAM_SECTION_ID, end=True).eos().footer(_RAM_SECTION_ID)
        return w.finish(
            self.devices, description=self.has_description, section_ids=self._device_ids()
        )
