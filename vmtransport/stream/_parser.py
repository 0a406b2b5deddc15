"""A sans-io parser of QEMU's migration stream (QEMU 7.2 through 10.x).

Feed it the bytes as they pass between QEMU and a file; it validates them as they go
and describes them. It never does I/O and never copies a RAM page: payloads are
skipped by counting, and long runs of page records are checked a column at a time
(one strided copy of their headers), so a GiB of 4 KiB pages costs ~0.05 CPU-s.

Layout (big-endian throughout; QEMU's ``migration/savevm.c`` and ``migration/ram.c``):

    header        be32 "QEVM", be32 3
    configuration 0x07, be32 len, machine type, subsections (0x05 ...) -- no footer
    sections      0x01 START / 0x04 FULL: be32 id, u8 len, idstr, be32 instance, be32 version
                  0x02 PART / 0x03 END:   be32 id
                  payload, then a footer 0x7e + be32 id (every machine type since 2.4)
    commands      0x08, be16 cmd, be16 len, data -- no footer
    EOF           0x00
    description   0x06, be32 len, JSON (unless the machine suppresses it)

RAM (idstr ``ram``) is a run of be64 ``offset | flags`` words and is self-delimiting.
Device (FULL) sections are not: their layout is only known from the JSON description
that arrives last. They come after RAM and are small, so the parser buffers everything
from the first device section on and delimits it at :meth:`StreamParser.close`: each
section ends where the description's next device's header starts (or, without a
description, at a footer that a plausible header follows). The rare non-RAM sections
met while RAM still streams (early-setup devices, other iterables such as dirty
bitmaps) are delimited on the fly by their footer.
"""

from __future__ import annotations

import struct
from typing import Any, Final, NamedTuple, final

from .._errors import StreamError

__all__ = [
    "EOF",
    "BlockStats",
    "Command",
    "Configuration",
    "DeviceSection",
    "Event",
    "Header",
    "RAMBlock",
    "SectionStart",
    "StreamParser",
    "VMDescription",
]

QEMU_VM_FILE_MAGIC: Final = 0x5145564D
QEMU_VM_FILE_VERSION: Final = 3
_MAGIC: Final = b"QEVM"

# Section types
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

# RAM flags, in the low bits of each be64 word
_ZERO: Final = 0x02
_MEM_SIZE: Final = 0x04
_PAGE: Final = 0x08
_EOS: Final = 0x10
_CONTINUE: Final = 0x20
_XBZRLE: Final = 0x40
_HOOK: Final = 0x80
_COMPRESS_PAGE: Final = 0x100
_MULTIFD_FLUSH: Final = 0x200
_RAM_VERSION: Final = 4
_XBZRLE_ENCODING: Final = 0x01

# MIG_CMD_* (enum qemu_vm_cmd in savevm.c); value: (name, fixed length or -1)
_COMMANDS: Final[dict[int, tuple[str, int]]] = {
    1: ("OPEN_RETURN_PATH", 0),
    2: ("PING", 4),
    3: ("POSTCOPY_ADVISE", -1),
    4: ("POSTCOPY_LISTEN", 0),
    5: ("POSTCOPY_RUN", 0),
    6: ("POSTCOPY_RAM_DISCARD", -1),
    7: ("PACKAGED", 4),
    8: ("ENABLE_COLO", 0),
    9: ("POSTCOPY_RESUME", 0),
    10: ("RECV_BITMAP", -1),
    11: ("SWITCHOVER_START", 0),
}
_CMD_POSTCOPY_ADVISE: Final = 3
_CMD_PACKAGED: Final = 7

#: Device state past this size is not a plausible QEMU stream (VGA memory is RAM, not this).
MAX_TAIL: Final = 64 << 20
# Largest element parsed in one piece: a command (be16 length) with its header.
_MAX_ELEMENT: Final = 0x10000 + 16
_JOIN: Final = _MAX_ELEMENT + 512
_MAX_MACHINE_NAME: Final = 1024

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_CMD_HDR = struct.Struct(">BHH")


# --- events --------------------------------------------------------------------------


@final
class Header(NamedTuple):
    """The stream's magic and version were read (the version is always 3)."""

    version: int


@final
class Configuration(NamedTuple):
    """The configuration section: machine type and, when present, its subsections."""

    machine_type: str
    #: Migration capabilities QEMU asks the destination to match (``x-ignore-shared``...).
    capabilities: tuple[str, ...] = ()
    target_page_bits: int | None = None
    uuid: str | None = None


@final
class SectionStart(NamedTuple):
    """A START or FULL section header."""

    section_type: str  # 'start' | 'full'
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@final
class RAMBlock(NamedTuple):
    """One entry of the RAM setup block list."""

    name: str
    used_length: int


@final
class Command(NamedTuple):
    """A QEMU_VM_COMMAND (no footer follows it)."""

    cmd: int
    data: bytes

    @property
    def name(self) -> str:
        return _COMMANDS.get(self.cmd, ("UNKNOWN", -1))[0]


@final
class DeviceSection(NamedTuple):
    """A non-RAM START or FULL section whose payload size is known."""

    idstr: str
    instance_id: int
    version_id: int
    section_id: int
    #: Payload bytes, without the section header and footer.
    size: int
    #: Stream offset of the section's type byte.
    offset: int = -1


@final
class EOF(NamedTuple):
    """QEMU's EOF marker, the 0x00 section type, is at stream offset ``offset``."""

    offset: int


@final
class VMDescription(NamedTuple):
    """The JSON description QEMU appends after EOF."""

    json: dict[str, Any]


Event = (
    Header | Configuration | SectionStart | RAMBlock | Command | DeviceSection | EOF | VMDescription
)


@final
class BlockStats(NamedTuple):
    """Per RAM block counters of the page records seen in the stream."""

    used_length: int
    normal_pages: int
    zero_pages: int
    xbzrle_pages: int = 0


# --- parser --------------------------------------------------------------------------

# Parser states
_S_HEADER: Final = 0
_S_TOP: Final = 1  # expecting a section type byte
_S_RAM: Final = 2  # inside a RAM section: be64 words
_S_FOOTER: Final = 3  # expecting a section footer
_S_OPAQUE: Final = 4  # non-RAM section met while RAM still streams: scan for its footer
_S_TAIL: Final = 5  # device state, EOF and description: buffered until close()
_S_CLOSED: Final = 6
_S_FAILED: Final = 7


def _printable(b: bytes | bytearray | memoryview) -> bool:
    return all(0x20 <= c < 0x7F for c in b)


# Runs of CONTINUE records shorter than this go record by record; longer ones are
# checked a column at a time. A run is probed with _PROBE records first, so that
# interleaved page kinds don't pay for long copies; after a failed probe the record
# loop waits _COOL records before probing again, twice as long after each failure.
_BATCH_MIN: Final = 16
_PROBE: Final = 64
_BATCH_MAX: Final = 4096
_COOL: Final = 16
_COOL_MAX: Final = 1024
# bytes.translate table: 0 where the low nibble is clear (flag bits 8-11 of a RAM word).
_NIBBLE: Final = bytes(0 if c & 0x0F == 0 else 1 for c in range(256))


def _run_length(mv: memoryview, pos: int, end: int, stride: int, low: int, limit: int) -> int:
    """How many records of `stride` bytes from pos on are CONTINUE records with flags
    `low`, an offset below `limit` and (zero pages) fill byte 0; 0 if fewer than
    _BATCH_MIN. A per-record Python loop costs several hundred ns per page; this costs
    a few dozen."""
    total = 0
    want = _PROBE
    while total < _BATCH_MAX:
        m = min((end - pos) // stride, want)
        if m <= 0:
            break
        k = _good_records(mv, pos, m, stride, low, limit)
        total += k
        pos += k * stride
        if k < m:
            break
        want = _BATCH_MAX - total
    return total if total >= _BATCH_MIN else 0


def _good_records(mv: memoryview, pos: int, m: int, stride: int, low: int, limit: int) -> int:
    """The number of leading good records among the m at pos (see _run_length)."""
    stop = pos + m * stride
    if stride % 8 == 0:
        # Pages: stride is a multiple of 8, so a 'Q' view steps from header to header and
        # one strided copy gathers the raw big-endian headers into 8 * m bytes.
        hdrs = mv[pos:stop].cast("Q")[:: stride // 8].tobytes()
        width = 8
    else:
        # Zero pages (9 bytes each) are dense: read their columns in place.
        hdrs = mv[pos:stop].tobytes()
        width = stride
    k = m - len(hdrs[7::width].lstrip(bytes((low,))))
    bad = hdrs[6 : k * width : width].translate(_NIBBLE).find(1)
    if bad >= 0:
        k = bad
    if width == 9:  # the fill byte follows the header
        k -= len(hdrs[8 : k * 9 : 9].lstrip(b"\0"))
    if k == 0:
        return 0
    # Offsets: compare column maxima with limit - 1 from the top byte down; the first
    # column below it settles the matter for every record.
    want = (limit - 1).to_bytes(8, "big")
    for i in range(7):
        col = hdrs[i : k * width : width]
        w = want[i]
        # max() walks the column in Python objects: spare it the common bytes 0 and ff.
        if w == 0:
            if col.lstrip(b"\0"):
                break
        elif w == 0xFF:
            if 0xFF not in col:
                return k
        else:
            top = max(col)
            if top < w:
                return k
            if top > w:
                break
    else:
        return k
    # Undecided by the maxima: check each offset (rare: only odd-sized blocks get here).
    for j in range(k):
        if int.from_bytes(hdrs[j * width : j * width + 8], "big") >= limit:
            return j
    return k


def _runstate(t: bytes, pos: int, size: int) -> str | None:
    """globalstate's payload: be32 length (with the NUL), then a 100-byte buffer."""
    if size < 4 or pos + size > len(t):
        return None
    (n,) = struct.unpack_from(">I", t, pos)
    raw = t[pos + 4 : pos + 4 + min(n, size - 4, 100)].split(b"\0", 1)[0]
    return raw.decode("ascii", "replace") if raw and _printable(raw) else None


@final
class StreamParser:
    """Incremental parser of one QEMU migration stream.

    ``feed()`` chunks of any size as they arrive (a chunk may end anywhere, inside a
    page header or an idstr); call ``close()`` at end of input. Both return the events
    the bytes completed. Malformed or incomplete input raises
    :class:`~vmtransport.StreamError`, and the parser then refuses further input.
    """

    def __init__(self, *, page_size: int = 4096, require_description: bool = False) -> None:
        if page_size < 1024 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1024, not {page_size}")
        self._page_size = page_size
        # QEMU sends a description unless the machine suppresses it; a stream cut right
        # after its EOF byte looks complete unless the caller knows one must follow.
        self._require_description = require_description
        self._state = _S_HEADER
        self._events: list[Event] = []
        self._fed = 0
        # Bytes of an element that a chunk boundary cut, or bytes handed back after a
        # footer scan; _pb_off is the stream offset of their first byte.
        self._pushback = b""
        self._pb_off = 0
        self._skip = 0  # payload bytes still to skip (RAM page, XBZRLE data, package)
        self._skip_what = ""
        self._config: Configuration | None = None
        self._ignore_shared = False
        self._postcopy_advised = False
        self._footers: bool | None = None  # unknown until the first section ends
        # section_id -> idstr of START sections; ids still open (no END yet)
        self._sections: dict[int, str] = {}
        self._open: set[int] = set()
        self._section_id = -1
        self._section_name = ""
        self._ram_id: int | None = None
        self._ram_iterations = 0
        # RAM blocks: name -> [used_length, normal, zero, xbzrle]
        self._blocks: dict[str, list[int]] = {}
        self._cur: list[int] | None = None
        self._cur_name = ""
        self._cur_limit = 0
        # Opaque section (footer scan)
        self._op_buf = bytearray()
        self._op_scan = 0
        self._op_off = 0
        self._op_header: SectionStart | None = None
        # Tail
        self._tail = bytearray()
        self._tail_off = -1
        self._eof_offset: int | None = None
        self._complete = False
        self._description: dict[str, Any] | None = None
        self._runstate: str | None = None

    # --- public interface ------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """True once close() found EOF where it belongs and any VM description whole."""
        return self._complete

    @property
    def offset(self) -> int:
        """Stream bytes consumed so far (parsed, skipped or buffered)."""
        return self._pb_off if self._pushback else self._fed

    @property
    def eof_offset(self) -> int | None:
        """Stream offset of QEMU's EOF byte, once known (at close() at the latest)."""
        return self._eof_offset

    @property
    def configuration(self) -> Configuration | None:
        return self._config

    @property
    def ram_iterations(self) -> int:
        """PART sections of RAM seen: one per pass over dirty memory, roughly."""
        return self._ram_iterations

    @property
    def ram_blocks(self) -> dict[str, BlockStats]:
        """Page counts per RAM block, from the setup block list and the page records."""
        return {n: BlockStats(*v) for n, v in self._blocks.items()}

    @property
    def runstate(self) -> str | None:
        """The run state the stream records (``globalstate``), after close(): what the
        destination does after loading (running, paused, prelaunch...)."""
        return self._runstate

    @property
    def description(self) -> dict[str, Any] | None:
        """The VM description JSON, after a successful close()."""
        return self._description

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse ``data``; returns the events it completed."""
        self._check_open()
        mv = memoryview(data).cast("B")
        base = self._fed
        self._fed += len(mv)
        events: list[Event] = []
        self._events = events
        try:
            self._feed(mv, base)
        except StreamError:
            self._state = _S_FAILED
            raise
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            # A safety net: bad bytes must only ever surface as StreamError.
            self._state = _S_FAILED
            raise StreamError(f"malformed QEMU stream near offset {self.offset}: {exc}") from exc
        return events

    def close(self) -> list[Event]:
        """End of input: delimit the buffered device state; raise if incomplete."""
        self._check_open()
        events: list[Event] = []
        self._events = events
        try:
            self._close()
        except StreamError:
            self._state = _S_FAILED
            raise
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            self._state = _S_FAILED
            raise StreamError(f"malformed QEMU stream near its end: {exc}") from exc
        self._state = _S_CLOSED
        return events

    # --- chunk machinery -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state == _S_FAILED:
            raise StreamError("the stream was already found malformed")
        if self._state == _S_CLOSED:
            raise StreamError("the parser was already closed")

    def _feed(self, mv: memoryview, base: int) -> None:
        n = len(mv)
        pos = 0
        while True:
            if self._pushback:
                # Join the cut element with the start of the new data: copies at most
                # _JOIN bytes, whatever the chunk size.
                head = self._pushback
                hoff = self._pb_off
                self._pushback = b""
                take = min(n - pos, _JOIN)
                buf = head + mv[pos : pos + take].tobytes()
                bpos = self._run(memoryview(buf), 0, hoff)
                used = bpos - len(head)
                if used >= 0:
                    pos += used
                elif take == n - pos:
                    if not self._pushback:  # still incomplete: keep it for the next chunk
                        self._pushback = buf[bpos:]
                        self._pb_off = hoff + bpos
                    return
                else:  # unreachable with elements <= _MAX_ELEMENT; kept for safety
                    self._pushback = buf[bpos:] + mv[pos + take :].tobytes()
                    self._pb_off = hoff + bpos
                    pos = n
                continue
            if pos >= n:
                return
            new = self._run(mv, pos, base)
            if self._pushback:
                pos = new
                continue
            if new < n:
                self._pushback = mv[new:].tobytes()
                self._pb_off = base + new
                return
            pos = new

    def _run(self, mv: memoryview, pos: int, base: int) -> int:
        """Parse mv[pos:] as far as complete elements go; returns where it stopped."""
        end = len(mv)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            state = self._state
            if state == _S_RAM:
                new = self._ram(mv, pos, end, base)
            elif state == _S_TOP:
                new = self._top(mv, pos, end, base)
            elif state == _S_TAIL:
                self._tail += mv[pos:end]
                if len(self._tail) > MAX_TAIL:
                    raise StreamError(
                        f"device state after RAM exceeds {MAX_TAIL >> 20} MiB "
                        f"(from offset {self._tail_off}): not a plausible QEMU stream"
                    )
                return end
            elif state == _S_FOOTER:
                new = self._footer(mv, pos, end, base)
            elif state == _S_OPAQUE:
                new = self._opaque(mv, pos, end, base)
                if self._pushback:
                    return new
            elif state == _S_HEADER:
                new = self._header(mv, pos, end)
            else:  # pragma: no cover - closed/failed are refused before
                raise AssertionError(state)
            if new == pos and self._state == state:
                return pos  # the next element is incomplete
            pos = new
        return pos

    # --- elements --------------------------------------------------------------------

    def _header(self, mv: memoryview, pos: int, end: int) -> int:
        have = mv[pos : min(end, pos + 8)].tobytes()
        if not _MAGIC.startswith(have[:4]):
            raise StreamError(
                f"not a QEMU migration stream: starts {have[:4].hex()}, expected 5145564d"
            )
        if len(have) < 8:
            return pos
        version = _BE32.unpack_from(have, 4)[0]
        if version == 2:
            raise StreamError("QEMU migration stream version 2 is obsolete")
        if version != QEMU_VM_FILE_VERSION:
            raise StreamError(f"unsupported QEMU migration stream version {version}")
        self._events.append(Header(version))
        self._state = _S_TOP
        return pos + 8

    def _top(self, mv: memoryview, pos: int, end: int, base: int) -> int:
        kind = mv[pos]
        if kind == _PART or kind == _END:
            if end - pos < 5:
                return pos
            sid = _BE32.unpack_from(mv, pos + 1)[0]
            name = self._sections.get(sid)
            if name is None or sid not in self._open:
                raise StreamError(
                    f"section {'PART' if kind == _PART else 'END'} for unknown or ended "
                    f"section id {sid} at offset {base + pos}"
                )
            self._section_id, self._section_name = sid, name
            if kind == _END:
                self._open.discard(sid)
            if sid == self._ram_id:
                if kind == _PART:
                    self._ram_iterations += 1
                self._state = _S_RAM
            else:
                self._start_opaque(None, base + pos + 5)
            return pos + 5
        if kind == _START or kind == _FULL:
            hdr = self._section_header(mv, pos, end, base)
            if hdr is None:
                return pos
            start, hlen = hdr
            self._section_id, self._section_name = start.section_id, start.idstr
            if kind == _FULL and (
                (self._config is None and not self._sections) or (self._sections and not self._open)
            ):
                # Device state: after RAM ended, or a device-state-only file. Buffer
                # everything from here on; close() delimits it.
                self._start_tail(base + pos)
                return pos
            self._events.append(start)
            if kind == _START:
                if start.section_id in self._sections:
                    raise StreamError(f"section id {start.section_id} started twice")
                self._sections[start.section_id] = start.idstr
                self._open.add(start.section_id)
            if kind == _START and start.idstr == "ram" and start.instance_id == 0:
                if start.version_id != _RAM_VERSION:
                    raise StreamError(f"unsupported RAM section version {start.version_id}")
                if self._ram_id is not None:
                    raise StreamError("a second RAM section started")
                self._ram_id = start.section_id
                self._state = _S_RAM
            else:
                # An early-setup device (FULL) or another iterable (START): their
                # payloads are opaque; find the end by the section footer.
                self._start_opaque(start, base + pos + hlen)
            return pos + hlen
        if kind == _COMMAND:
            return self._command(mv, pos, end, base)
        if kind == _CONFIGURATION:
            if self._config is not None or self._sections:
                raise StreamError(f"unexpected configuration section at offset {base + pos}")
            return self._configuration(mv, pos, end, base)
        if kind == _EOF:
            self._section_name = ""
            self._start_tail(base + pos)
            return pos
        if kind == _FOOTER:
            raise StreamError(f"section footer without a section at offset {base + pos}")
        raise StreamError(f"unknown section type 0x{kind:02x} at offset {base + pos}")

    def _section_header(
        self, mv: memoryview | bytes | bytearray, pos: int, end: int, base: int
    ) -> tuple[SectionStart, int] | None:
        """START/FULL header at pos: (event, header length), or None if incomplete."""
        if end - pos < 6:
            return None
        ln = mv[pos + 5]
        hlen = 6 + ln + 8
        if end - pos < hlen:
            return None
        raw = bytes(mv[pos + 6 : pos + 6 + ln])
        if ln == 0 or not _printable(raw):
            raise StreamError(f"bad section idstr {raw!r} at offset {base + pos}")
        sid = _BE32.unpack_from(mv, pos + 1)[0]
        instance, version = struct.unpack_from(">II", mv, pos + 6 + ln)
        kind = "start" if mv[pos] == _START else "full"
        return SectionStart(kind, sid, raw.decode("ascii"), instance, version), hlen

    def _command(self, mv: memoryview, pos: int, end: int, base: int) -> int:
        if end - pos < 5:
            return pos
        cmd: int
        ln: int
        _, cmd, ln = _CMD_HDR.unpack_from(mv, pos)
        spec = _COMMANDS.get(cmd)
        if spec is None:
            raise StreamError(f"unknown QEMU_VM_COMMAND {cmd} at offset {base + pos}")
        name, fixed = spec
        if fixed >= 0 and ln != fixed:
            raise StreamError(f"command {name} with length {ln}, expected {fixed}")
        if end - pos < 5 + ln:
            return pos
        data = mv[pos + 5 : pos + 5 + ln].tobytes()
        self._events.append(Command(cmd, data))
        if cmd == _CMD_POSTCOPY_ADVISE and ln == 16:
            self._postcopy_advised = True
        elif cmd == _CMD_PACKAGED:
            # A nested stream (postcopy's device state) follows the command: skip it.
            self._skip = _BE32.unpack_from(data)[0]
            self._skip_what = "a packaged command's data"
        return pos + 5 + ln

    def _configuration(self, mv: memoryview, pos: int, end: int, base: int) -> int:
        p = pos + 1
        if end - p < 4:
            return pos
        ln: int = _BE32.unpack_from(mv, p)[0]
        if ln > _MAX_MACHINE_NAME:
            raise StreamError(f"implausible machine type length {ln} at offset {base + p}")
        p += 4
        if end - p < ln + 1:  # + 1: is a subsection next?
            return pos
        raw = mv[p : p + ln].tobytes()
        if not _printable(raw):
            raise StreamError(f"bad machine type {raw!r} in the configuration section")
        p += ln
        caps: list[str] = []
        bits: int | None = None
        uuid: str | None = None
        while mv[p] == _SUBSECTION:
            # 0x05, u8 len, name, be32 version_id, fields; no terminator after the last.
            if end - p < 2 or end - p < 2 + mv[p + 1] + 4:
                return pos
            nl = mv[p + 1]
            sub = mv[p + 2 : p + 2 + nl].tobytes().decode("ascii", "replace")
            q = p + 2 + nl + 4
            if sub == "configuration/target-page-bits":
                if end - q < 5:
                    return pos
                bits = _BE32.unpack_from(mv, q)[0]
                q += 4
            elif sub == "configuration/capabilities":
                if end - q < 4:
                    return pos
                count = _BE32.unpack_from(mv, q)[0]
                q += 4
                caps = []
                for _ in range(count):
                    if end - q < 1 or end - q < 1 + mv[q]:
                        return pos
                    cap = mv[q + 1 : q + 1 + mv[q]].tobytes()
                    if not _printable(cap):
                        raise StreamError(f"bad capability name {cap!r} in the configuration")
                    caps.append(cap.decode("ascii"))
                    q += 1 + mv[q]
                if end - q < 1:
                    return pos
            elif sub == "configuration/uuid":
                if end - q < 17:
                    return pos
                u = mv[q : q + 16].hex()
                uuid = f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
                q += 16
            else:
                raise StreamError(f"unknown configuration subsection {sub!r}")
            p = q
        if bits is not None:
            if not 10 <= bits <= 16:
                raise StreamError(f"implausible target page bits {bits}")
            self._page_size = 1 << bits
        if "mapped-ram" in caps:
            raise StreamError(
                "mapped-ram streams keep pages at fixed file offsets and cannot be "
                "parsed as a sequential stream"
            )
        self._ignore_shared = "x-ignore-shared" in caps
        self._config = Configuration(raw.decode("ascii"), tuple(caps), bits, uuid)
        self._events.append(self._config)
        return p

    def _footer(self, mv: memoryview, pos: int, end: int, base: int) -> int:
        if self._footers is None:
            self._footers = mv[pos] == _FOOTER
        if not self._footers:
            self._state = _S_TOP
            return pos
        if end - pos < 5:
            return pos
        if mv[pos] != _FOOTER:
            raise StreamError(
                f"missing section footer for section '{self._section_name}' at offset {base + pos}"
            )
        sid = _BE32.unpack_from(mv, pos + 1)[0]
        if sid != self._section_id:
            raise StreamError(
                f"section footer id {sid} does not match section {self._section_id} "
                f"('{self._section_name}') at offset {base + pos}"
            )
        self._state = _S_TOP
        return pos + 5

    # --- RAM ---------------------------------------------------------------------------

    def _ram(self, mv: memoryview, pos: int, end: int, base: int) -> int:
        """The hot loop: page records, then whatever ends the section."""
        unpack = _BE64.unpack_from
        ps = self._page_size
        mask = ps - 1
        cont_page = _PAGE | _CONTINUE
        cont_zero = _ZERO | _CONTINUE
        stride_page = 8 + ps
        limit = self._cur_limit
        normal = zero = cool = 0
        backoff = _COOL
        try:
            while end - pos >= 8:
                (word,) = unpack(mv, pos)
                flags = word & mask
                if flags == cont_page and word < limit:
                    if cool:
                        cool -= 1
                    elif end - pos >= stride_page * _BATCH_MIN:
                        k = _run_length(mv, pos, end, stride_page, cont_page, limit)
                        if k:
                            normal += k
                            backoff = _COOL
                            pos += k * stride_page
                            continue
                        cool = backoff
                        backoff = min(2 * backoff, _COOL_MAX)
                    normal += 1
                    pos += 8 + ps
                    if pos > end:
                        self._skip = pos - end
                        self._skip_what = "a RAM page"
                        return end
                    continue
                if flags == cont_zero and word < limit:
                    if cool:
                        cool -= 1
                    elif end - pos >= 9 * _BATCH_MIN:
                        k = _run_length(mv, pos, end, 9, cont_zero, limit)
                        if k:
                            zero += k
                            backoff = _COOL
                            pos += k * 9
                            continue
                        cool = backoff
                        backoff = min(2 * backoff, _COOL_MAX)
                    if end - pos < 9:
                        return pos
                    if mv[pos + 8]:
                        raise StreamError(
                            f"zero page with fill byte {mv[pos + 8]} at offset {base + pos}"
                        )
                    zero += 1
                    pos += 9
                    continue
                # Anything else: a new block, another record type, or the section end.
                cur = self._cur
                if cur is not None:
                    cur[1] += normal
                    cur[2] += zero
                normal = zero = 0
                new = self._ram_record(mv, pos, end, base, word, flags)
                if new == pos or self._state != _S_RAM:
                    return new
                pos = new
                limit = self._cur_limit
            return pos
        finally:
            cur = self._cur
            if cur is not None:
                cur[1] += normal
                cur[2] += zero

    def _ram_record(
        self, mv: memoryview, pos: int, end: int, base: int, word: int, flags: int
    ) -> int:
        kind = flags & ~_CONTINUE
        if kind in (_PAGE, _ZERO, _XBZRLE):
            p = pos + 8
            if flags & _CONTINUE:
                if self._cur is None:
                    raise StreamError(f"RAM page continues no block at offset {base + pos}")
            else:
                if end - p < 1 or end - p < 1 + mv[p]:
                    return pos
                name = mv[p + 1 : p + 1 + mv[p]].tobytes().decode("utf-8", "replace")
                p += 1 + mv[p]
                block = self._blocks.get(name)
                if block is None:
                    raise StreamError(f"RAM page for unknown block {name!r} at offset {base + pos}")
                if end - p < (1 if kind == _ZERO else 3 if kind == _XBZRLE else 0):
                    return pos  # keep the record whole: don't switch blocks half-way
                self._cur, self._cur_name, self._cur_limit = block, name, block[0]
            assert self._cur is not None
            if word - flags >= self._cur_limit:
                raise StreamError(
                    f"RAM page offset 0x{word - flags:x} beyond block {self._cur_name!r} "
                    f"(0x{self._cur_limit:x} bytes) at offset {base + pos}"
                )
            if kind == _PAGE:
                self._cur[1] += 1
                p += self._page_size
                if p > end:
                    self._skip = p - end
                    self._skip_what = "a RAM page"
                    return end
                return p
            if kind == _ZERO:
                if end - p < 1:
                    return pos
                if mv[p]:
                    raise StreamError(f"zero page with fill byte {mv[p]} at offset {base + p}")
                self._cur[2] += 1
                return p + 1
            # XBZRLE: u8 encoding, be16 length, encoded data
            if end - p < 3:
                return pos
            if mv[p] != _XBZRLE_ENCODING:
                raise StreamError(f"bad XBZRLE encoding {mv[p]} at offset {base + p}")
            ln: int = _BE16.unpack_from(mv, p + 1)[0]
            if ln > self._page_size:
                raise StreamError(f"XBZRLE page of {ln} bytes at offset {base + p}")
            self._cur[3] += 1
            p += 3 + ln
            if p > end:
                self._skip = p - end
                self._skip_what = "an XBZRLE page"
                return end
            return p
        if flags == _EOS:
            # Keep the current block: both ends remember it across sections, and QEMU
            # does start a section with a CONTINUE record.
            self._state = _S_FOOTER
            return pos + 8
        if flags == _MULTIFD_FLUSH:
            return pos + 8
        if flags == _MEM_SIZE:
            return self._ram_blocks(mv, pos, end, base, word - flags)
        if flags & _COMPRESS_PAGE:
            raise StreamError(
                "compressed RAM pages (the 'compress' capability) are not supported "
                f"(offset {base + pos})"
            )
        if flags & _HOOK:
            raise StreamError(f"RDMA RAM hooks in a stream at offset {base + pos}")
        raise StreamError(f"unknown RAM flags 0x{flags:x} at offset {base + pos}")

    def _ram_blocks(self, mv: memoryview, pos: int, end: int, base: int, total: int) -> int:
        """The setup block list: u8 len, name, be64 used_length [, page size] [, addr]."""
        if self._blocks:
            raise StreamError(f"a second RAM block list at offset {base + pos}")
        blocks: list[tuple[str, int]] = []
        p = pos + 8
        remaining = total
        while remaining > 0:
            if end - p < 1:
                return pos
            ln = mv[p]
            need = 1 + ln + 8 + 8 + (8 if self._ignore_shared else 0)
            if end - p < need:  # the 8 spare bytes: to recognise a page size field
                return pos
            raw = mv[p + 1 : p + 1 + ln].tobytes()
            if ln == 0 or not _printable(raw):
                raise StreamError(f"bad RAM block name {raw!r} at offset {base + p}")
            used = _BE64.unpack_from(mv, p + 1 + ln)[0]
            p += 1 + ln + 8
            if self._postcopy_advised:
                # Written only for blocks whose page size differs from the host's
                # (huge pages): a power of two, where a name length byte or a flags
                # word would be.
                (maybe,) = _BE64.unpack_from(mv, p)
                if 0x2000 <= maybe < 1 << 32 and maybe & (maybe - 1) == 0:
                    p += 8
            if self._ignore_shared:
                if end - p < 8:
                    return pos
                p += 8
            if used > remaining or used % self._page_size:
                raise StreamError(
                    f"RAM block {raw!r} of 0x{used:x} bytes does not fit the announced "
                    f"total 0x{total:x}"
                )
            remaining -= used
            blocks.append((raw.decode("ascii"), used))
        for name, used in blocks:
            if name in self._blocks:
                raise StreamError(f"RAM block {name!r} listed twice")
            self._blocks[name] = [used, 0, 0, 0]
            self._events.append(RAMBlock(name, used))
        return p

    # --- opaque sections (streamed, delimited by their footer) ----------------------

    def _start_opaque(self, start: SectionStart | None, payload_off: int) -> None:
        if self._footers is False:
            raise StreamError(
                f"cannot delimit section '{self._section_name}' of a stream without section footers"
            )
        self._state = _S_OPAQUE
        self._op_buf = bytearray()
        self._op_scan = 0
        self._op_off = payload_off
        self._op_header = start

    def _opaque(self, mv: memoryview, pos: int, end: int, base: int) -> int:
        marker = bytes([_FOOTER]) + _BE32.pack(self._section_id)
        buf = self._op_buf
        while pos < end:
            take = min(end - pos, 1 << 16)
            buf += mv[pos : pos + take]
            pos += take
            if len(buf) > MAX_TAIL:
                raise StreamError(
                    f"section '{self._section_name}' exceeds {MAX_TAIL >> 20} MiB without "
                    "its footer"
                )
            i = buf.find(marker, self._op_scan)
            while i >= 0:
                ok = self._plausible_next(buf, i + 5)
                if ok is None:
                    break
                if ok:
                    return self._end_opaque(mv, pos, end, i, take)
                i = buf.find(marker, i + 1)
            self._op_scan = max(0, len(buf) - 4) if i < 0 else i
        return pos

    def _end_opaque(self, mv: memoryview, pos: int, end: int, i: int, take: int) -> int:
        buf = self._op_buf
        start = self._op_header
        if start is not None:
            self._events.append(
                DeviceSection(
                    start.idstr,
                    start.instance_id,
                    start.version_id,
                    start.section_id,
                    i,
                    self._op_off - 6 - len(start.idstr) - 8,
                )
            )
        self._footers = True
        self._state = _S_TOP
        over = len(buf) - (i + 5)
        self._op_buf = bytearray()
        if over <= take:
            return pos - over  # the bytes after the footer are still in mv: resume there
        self._pushback = bytes(buf[i + 5 :]) + mv[pos:end].tobytes()
        self._pb_off = self._op_off + i + 5
        return end

    def _plausible_next(self, b: bytes | bytearray, p: int, end: int = -1) -> bool | None:
        """Could b[p:end] start the element that follows a section? None: need more."""
        if end < 0:
            end = len(b)
        if p >= end:
            return None
        kind = b[p]
        if kind in (_START, _FULL):
            if end - p < 6:
                return None
            ln = b[p + 5]
            if end - p < 6 + ln + 8:
                return None
            return ln > 0 and _printable(b[p + 6 : p + 6 + ln])
        if kind in (_PART, _END):
            if end - p < 5:
                return None
            return _BE32.unpack_from(b, p + 1)[0] in self._open
        if kind == _COMMAND:
            if end - p < 5:
                return None
            _, cmd, ln = _CMD_HDR.unpack_from(b, p)
            spec = _COMMANDS.get(cmd)
            return spec is not None and spec[1] in (-1, ln)
        if kind == _EOF:
            if end - p < 2:
                return None
            return b[p + 1] == _VMDESCRIPTION
        return False

    # --- tail: device state, EOF, VM description ------------------------------------

    def _start_tail(self, off: int) -> None:
        self._state = _S_TAIL
        self._tail_off = off

    def _close(self) -> None:
        state = self._state
        if state == _S_HEADER:
            raise StreamError(f"stream ended inside its header (after {self._fed} bytes)")
        if state != _S_TAIL or self._skip or self._pushback:
            where = self._where()
            raise StreamError(
                f"stream ended before QEMU's EOF marker (after {self._fed} bytes, {where})"
            )
        self._resolve_tail(bytes(self._tail), self._tail_off)
        self._complete = True

    def _where(self) -> str:
        if self._skip:
            return f"inside {self._skip_what} in section '{self._section_name}'"
        if self._state == _S_TOP:
            return "between sections"
        if self._section_name:
            return f"in section '{self._section_name}'"
        return "in the configuration section"

    def _resolve_tail(self, t: bytes, base: int) -> None:
        desc, eof = self._find_description(t, base)
        if desc is not None:
            devices = desc.get("devices")
            if not isinstance(devices, list):
                raise StreamError("the VM description has no device list")
            try:
                sections = self._split_by_description(t, eof, devices, base)
            except StreamError:
                if self._footers is not None:
                    raise
                self._footers = False
                sections = self._split_by_description(t, eof, devices, base)
        else:
            sections = self._split_by_footers(t, eof, base)
            if self._require_description:
                raise StreamError(f"the VM description is missing (after {base + len(t)} bytes)")
        for start, size, off in sections:
            if start.idstr == "globalstate":
                self._runstate = _runstate(t, off - base + 14 + len(start.idstr), size)
            self._events.append(start)
            self._events.append(
                DeviceSection(
                    start.idstr, start.instance_id, start.version_id, start.section_id, size, off
                )
            )
        self._eof_offset = base + eof
        self._events.append(EOF(base + eof))
        if desc is not None:
            self._description = desc
            self._events.append(VMDescription(desc))

    def _find_description(self, t: bytes, base: int) -> tuple[dict[str, Any] | None, int]:
        """(description, index of EOF in t). The description is the very end of the
        stream and JSON holds no 0x00 or 0x06 byte, so search backwards for 00 06."""
        hi = len(t)
        while True:
            q = t.rfind(b"\x00\x06", 0, hi)
            if q < 0:
                break
            hi = q + 1
            if len(t) - q < 7 or t[q + 6] != 0x7B:  # '{'
                continue
            ln = _BE32.unpack_from(t, q + 2)[0]
            have = len(t) - q - 6
            if ln > have:
                raise StreamError(
                    f"stream ended inside the VM description ({have} of {ln} bytes, "
                    f"after {base + len(t)} bytes)"
                )
            if ln < have:
                raise StreamError(
                    f"{have - ln} unexpected bytes after the VM description "
                    f"(at offset {base + q + 6 + ln})"
                )
            try:
                import json  # only at the end of a stream: keeps helper start-up short

                desc = json.loads(t[q + 6 :])
            except (ValueError, UnicodeDecodeError) as exc:
                raise StreamError(f"the VM description is not valid JSON: {exc}") from exc
            if not isinstance(desc, dict):
                raise StreamError("the VM description is not a JSON object")
            return desc, q
        # No description: the machine suppresses it (or this is a device-state file).
        if not t or t[-1] != _EOF:
            raise StreamError(
                f"stream ended before QEMU's EOF marker (after {base + len(t)} bytes, "
                f"{self._tail_where(t, base)})"
            )
        return None, len(t) - 1

    def _tail_where(self, t: bytes, base: int) -> str:
        """Name the device section an incomplete tail ended in, by footer scanning."""
        p = 0
        name = ""
        while p < len(t) and t[p] == _FULL:
            hdr = self._section_header(t, p, len(t), base)
            if hdr is None:
                break
            start, hlen = hdr
            name = start.idstr
            nxt = self._next_footer(t, p + hlen, start.section_id, len(t))
            if nxt is None:
                break
            p = nxt
        return f"in section '{name}'" if name else "in the device state"

    def _next_footer(self, t: bytes, p: int, sid: int, limit: int) -> int | None:
        """Index after the footer of section sid that a plausible element follows."""
        marker = bytes([_FOOTER]) + _BE32.pack(sid)
        i = t.find(marker, p, limit)
        while i >= 0:
            after = i + 5
            if after == limit:
                return after
            if t[after] == _FULL and self._plausible_next(t, after, limit):
                return after
            i = t.find(marker, i + 1, limit)
        return None

    def _split_by_footers(
        self, t: bytes, eof: int, base: int
    ) -> list[tuple[SectionStart, int, int]]:
        out: list[tuple[SectionStart, int, int]] = []
        p = 0
        if eof > 0 and self._footers is False:
            raise StreamError(
                "cannot delimit the device sections: the stream has neither section "
                "footers nor a VM description"
            )
        while p < eof:
            if t[p] != _FULL:
                raise StreamError(
                    f"unexpected section type 0x{t[p]:02x} in the device state at offset {base + p}"
                )
            hdr = self._section_header(t, p, eof, base)
            if hdr is None:
                raise StreamError(f"truncated section header at offset {base + p}")
            start, hlen = hdr
            nxt = self._next_footer(t, p + hlen, start.section_id, eof)
            if nxt is None:
                # Without a description, EOF was only a guess (the last byte was 0).
                raise StreamError(
                    f"stream ended before QEMU's EOF marker (after {base + len(t)} bytes, "
                    f"in section '{start.idstr}'), or its device state is malformed"
                )
            out.append((start, nxt - 5 - p - hlen, base + p))
            p = nxt
        return out

    def _split_by_description(
        self, t: bytes, eof: int, devices: list[Any], base: int
    ) -> list[tuple[SectionStart, int, int]]:
        """Delimit the device sections with the description's device list, whose order is
        the sections' order: each section ends where the next listed one's header is."""
        names: list[tuple[str, int]] = []
        for d in devices:
            if not isinstance(d, dict):
                raise StreamError("bad device entry in the VM description")
            name, inst = d.get("name"), d.get("instance_id")
            if not isinstance(name, str) or not isinstance(inst, int):
                raise StreamError("bad device entry in the VM description")
            names.append((name, inst))
        foot = 5 if self._footers is not False else 0
        out: list[tuple[SectionStart, int, int]] = []
        p = 0
        j = 0
        while p < eof:
            if t[p] != _FULL:
                raise StreamError(
                    f"unexpected section type 0x{t[p]:02x} in the device state at offset {base + p}"
                )
            hdr = self._section_header(t, p, eof, base)
            if hdr is None:
                raise StreamError(f"truncated section header at offset {base + p}")
            start, hlen = hdr
            if p == 0:  # early-setup devices, listed first, were streamed before RAM
                while j < len(names) and names[j] != (start.idstr, start.instance_id):
                    j += 1
            if j >= len(names) or names[j] != (start.idstr, start.instance_id):
                j = len(names)
            if j >= len(names):
                raise StreamError(
                    f"device section '{start.idstr}' (instance {start.instance_id}) at "
                    f"offset {base + p} is not in the VM description"
                )
            body = p + hlen
            if j + 1 < len(names):
                nname, ninst = names[j + 1]
                pat = bytes([len(nname)]) + nname.encode() + _BE32.pack(ninst)
                h = -1
                i = t.find(pat, body, eof)
                while i >= 0:
                    c = i - 5  # the header's type byte
                    if c - foot >= body and t[c] == _FULL and self._footer_ok(t, c, start, foot):
                        h = c
                        break
                    i = t.find(pat, i + 1, eof)
                if h < 0:
                    raise StreamError(
                        f"device section '{nname}' (instance {ninst}), listed after "
                        f"'{start.idstr}' in the VM description, is missing from the stream"
                    )
            else:
                h = eof
                if h - foot < body or not self._footer_ok(t, h, start, foot):
                    raise StreamError(
                        f"the last device section '{start.idstr}' lacks its footer before EOF"
                    )
            out.append((start, h - foot - body, base + p))
            p = h
            j += 1
        return out

    @staticmethod
    def _footer_ok(t: bytes, h: int, start: SectionStart, foot: int) -> bool:
        if not foot:
            return True
        return t[h - 5] == _FOOTER and _BE32.unpack_from(t, h - 4)[0] == start.section_id
