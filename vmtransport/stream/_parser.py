"""A sans-io parser of QEMU's migration stream (QEMU 7.2 through 10.x).

Feed it the bytes as they pass between QEMU and a file; it validates them as they go
and describes them. It never does I/O and never copies a RAM page: payloads are
skipped by counting, and long runs of page records are checked a column at a time.

The parser is one state machine in parts: this module holds its core (chunk joining,
the header, the configuration, section headers and footers, commands); ``_ram`` the
RAM section, its hot path; ``_devices`` the device state, which is delimited only at
:meth:`StreamParser.close`. ``_wire`` has the stream's layout, ``_events`` what the
parser returns.
"""

from __future__ import annotations

import struct
from typing import Any, final

from .._errors import StreamError
from ._devices import DeviceParser, section_header
from ._events import (
    BlockStats,
    Command,
    Configuration,
    Event,
    Header,
)
from ._ram import RAMParser
from ._wire import (
    BE32,
    CMD_HDR,
    CMD_PACKAGED,
    CMD_POSTCOPY_ADVISE,
    COMMANDS,
    JOIN,
    MAGIC,
    MAX_MACHINE_NAME,
    MAX_TAIL,
    QEMU_VM_FILE_VERSION,
    RAM_VERSION,
    RETURN_PATH_ONLY,
    S_CLOSED,
    S_FAILED,
    S_FOOTER,
    S_HEADER,
    S_OPAQUE,
    S_RAM,
    S_TAIL,
    S_TOP,
    SEC_COMMAND,
    SEC_CONFIGURATION,
    SEC_END,
    SEC_EOF,
    SEC_FOOTER,
    SEC_FULL,
    SEC_PART,
    SEC_START,
    SEC_SUBSECTION,
    printable,
)

__all__ = ["StreamParser"]


@final
class StreamParser(RAMParser, DeviceParser):
    """Incremental parser of one QEMU migration stream.

    ``feed()`` chunks of any size as they arrive (a chunk may end anywhere, inside a
    page header or an idstr); call ``close()`` at end of input. Both return the events
    the bytes completed. Malformed or incomplete input raises
    :class:`~vmtransport.StreamError`, and the parser then refuses further input.
    """

    def __init__(self, *, page_size: int = 4096, require_description: bool | None = None) -> None:
        if page_size < 1024 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1024, not {page_size}")
        self._page_size = page_size
        # A stream cut right after its EOF byte looks complete unless a description must
        # follow. None: decide from the stream (see DeviceParser._description_required).
        self._require_description = require_description
        self._packaged = False  # a postcopy package was seen: QEMU sends no description
        self._state = S_HEADER
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
        self._complete = False
        self._held_from: int | None = None
        self._setup_end: int | None = None
        self._init_ram()
        self._init_devices()

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
    def held_from(self) -> int | None:
        """Stream offset of the first byte this parser does not follow exactly as QEMU
        reads it, once met; None while it follows every byte.

        Up to here the parser walks the bytes the way QEMU's loader does (header,
        configuration, section headers and footers, every RAM page record, commands),
        so a damaged byte there either breaks the structure for both or leaves both in
        step. From here on come bytes only QEMU can delimit (device state, read by
        vmstate descriptions the parser does not have; an opaque section; a package)
        and the EOF marker QEMU finishes on: a restore hands QEMU nothing from here
        until the whole stream is proven."""
        return self._held_from

    @property
    def setup_end(self) -> int | None:
        """Stream offset where the first iteration starts (the first PART or END
        section), once met: before it is the *setup* a destination QEMU checks against
        its own VM (machine type, capabilities, page size, sections, RAM block names
        and lengths) and refuses before loading anything."""
        return self._setup_end

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
            self._state = S_FAILED
            raise
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            # A safety net: bad bytes must only ever surface as StreamError.
            self._state = S_FAILED
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
            self._state = S_FAILED
            raise
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            self._state = S_FAILED
            raise StreamError(f"malformed QEMU stream near its end: {exc}") from exc
        self._state = S_CLOSED
        return events

    # --- chunk machinery -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state == S_FAILED:
            raise StreamError("the stream was already found malformed")
        if self._state == S_CLOSED:
            raise StreamError("the parser was already closed")

    def _feed(self, mv: memoryview, base: int) -> None:
        n = len(mv)
        pos = 0
        while True:
            if self._pushback:
                # Join the cut element with the start of the new data: copies at most
                # JOIN bytes, whatever the chunk size.
                head = self._pushback
                hoff = self._pb_off
                self._pushback = b""
                take = min(n - pos, JOIN)
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
                else:  # unreachable with elements <= MAX_ELEMENT; kept for safety
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
            if state == S_RAM:
                new = self._ram(mv, pos, end, base)
            elif state == S_TOP:
                new = self._top(mv, pos, end, base)
            elif state == S_TAIL:
                self._tail += mv[pos:end]
                if len(self._tail) > MAX_TAIL:
                    second = self._tail.find(MAGIC + BE32.pack(QEMU_VM_FILE_VERSION))
                    if second >= 0:  # refused anyway: name the likelier cause
                        raise StreamError(
                            f"bytes after the end of QEMU's stream (another stream starts "
                            f"at offset {self._tail_off + second}): one stream per image"
                        )
                    raise StreamError(
                        f"device state after RAM exceeds {MAX_TAIL >> 20} MiB "
                        f"(from offset {self._tail_off}): not a plausible QEMU stream"
                    )
                return end
            elif state == S_FOOTER:
                new = self._footer(mv, pos, end, base)
            elif state == S_OPAQUE:
                new = self._opaque(mv, pos, end, base)
                if self._pushback:
                    return new
            elif state == S_HEADER:
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
        if not MAGIC.startswith(have[:4]):
            raise StreamError(
                f"not a QEMU migration stream: starts {have[:4].hex()}, expected 5145564d"
            )
        if len(have) < 8:
            return pos
        version = BE32.unpack_from(have, 4)[0]
        if version == 2:
            raise StreamError("QEMU migration stream version 2 is obsolete")
        if version != QEMU_VM_FILE_VERSION:
            raise StreamError(f"unsupported QEMU migration stream version {version}")
        self._events.append(Header(version))
        self._state = S_TOP
        return pos + 8

    def _top(self, mv: memoryview, pos: int, end: int, base: int) -> int:
        kind = mv[pos]
        if kind == SEC_PART or kind == SEC_END:
            if end - pos < 5:
                return pos
            if self._setup_end is None:
                self._setup_end = base + pos
            sid = BE32.unpack_from(mv, pos + 1)[0]
            name = self._sections.get(sid)
            if name is None or sid not in self._open:
                raise StreamError(
                    f"section {'PART' if kind == SEC_PART else 'END'} for unknown or ended "
                    f"section id {sid} at offset {base + pos}"
                )
            self._section_id, self._section_name = sid, name
            if kind == SEC_END:
                self._open.discard(sid)
            if sid == self._ram_id:
                if kind == SEC_PART:
                    self._ram_iterations += 1
                self._state = S_RAM
            else:
                self._hold(base + pos)
                self._start_opaque(None, base + pos + 5)
            return pos + 5
        if kind == SEC_START or kind == SEC_FULL:
            if kind == SEC_FULL:
                # Never RAM (RAM is START/PART/END): held from its type byte, even while
                # its header is still incomplete (a stream cut there must not pass it).
                self._hold(base + pos)
            hdr = section_header(mv, pos, end, base)
            if hdr is None:
                return pos
            start, hlen = hdr
            self._section_id, self._section_name = start.section_id, start.idstr
            if kind == SEC_FULL and (
                (self._config is None and not self._sections) or (self._sections and not self._open)
            ):
                # Device state: after RAM ended, or a device-state-only file. Buffer
                # everything from here on; close() delimits it.
                self._start_tail(base + pos)
                return pos
            self._events.append(start)
            if kind == SEC_START:
                if start.section_id in self._sections:
                    raise StreamError(f"section id {start.section_id} started twice")
                self._sections[start.section_id] = start.idstr
                self._open.add(start.section_id)
            if kind == SEC_START and start.idstr == "ram" and start.instance_id == 0:
                if start.version_id != RAM_VERSION:
                    raise StreamError(f"unsupported RAM section version {start.version_id}")
                if self._ram_id is not None:
                    raise StreamError("a second RAM section started")
                self._ram_id = start.section_id
                self._state = S_RAM
            else:
                # An early-setup device (FULL) or another iterable (START): their
                # payloads are opaque; find the end by the section footer.
                self._hold(base + pos)
                self._start_opaque(start, base + pos + hlen)
            return pos + hlen
        if kind == SEC_COMMAND:
            return self._command(mv, pos, end, base)
        if kind == SEC_CONFIGURATION:
            if self._config is not None or self._sections:
                raise StreamError(f"unexpected configuration section at offset {base + pos}")
            return self._configuration(mv, pos, end, base)
        if kind == SEC_EOF:
            self._section_name = ""
            self._start_tail(base + pos)
            return pos
        if kind == SEC_FOOTER:
            raise StreamError(f"section footer without a section at offset {base + pos}")
        raise StreamError(f"unknown section type 0x{kind:02x} at offset {base + pos}")

    def _command(self, mv: memoryview, pos: int, end: int, base: int) -> int:
        if end - pos < 5:
            return pos
        cmd: int
        ln: int
        _, cmd, ln = CMD_HDR.unpack_from(mv, pos)
        spec = COMMANDS.get(cmd)
        if spec is None:
            raise StreamError(f"unknown QEMU_VM_COMMAND {cmd} at offset {base + pos}")
        name, fixed = spec
        if cmd in RETURN_PATH_ONLY:
            # Postcopy recovery and COLO talk both ways: never in a stream that was
            # saved. QEMU would refuse most of them on load before the parser did.
            raise StreamError(
                f"command {name} at offset {base + pos} is only sent over a return path "
                "(postcopy recovery, COLO), never in a saved stream"
            )
        if fixed >= 0 and ln != fixed:
            raise StreamError(f"command {name} with length {ln}, expected {fixed}")
        if end - pos < 5 + ln:
            return pos
        data = mv[pos + 5 : pos + 5 + ln].tobytes()
        self._events.append(Command(cmd, data))
        if cmd == CMD_POSTCOPY_ADVISE and ln == 16:
            self._postcopy_advised = True
        elif cmd == CMD_PACKAGED:
            # A nested stream (postcopy's device state) follows the command: skip it.
            self._hold(base + pos)
            self._skip = BE32.unpack_from(data)[0]
            self._skip_what = "a packaged command's data"
            self._packaged = True
        return pos + 5 + ln

    def _configuration(self, mv: memoryview, pos: int, end: int, base: int) -> int:
        p = pos + 1
        if end - p < 4:
            return pos
        ln: int = BE32.unpack_from(mv, p)[0]
        if ln > MAX_MACHINE_NAME:
            raise StreamError(f"implausible machine type length {ln} at offset {base + p}")
        p += 4
        if end - p < ln + 1:  # + 1: is a subsection next?
            return pos
        raw = mv[p : p + ln].tobytes()
        if not printable(raw):
            raise StreamError(f"bad machine type {raw!r} in the configuration section")
        p += ln
        caps: list[str] = []
        bits: int | None = None
        uuid: str | None = None
        while mv[p] == SEC_SUBSECTION:
            # 0x05, u8 len, name, be32 version_id, fields; no terminator after the last.
            if end - p < 2 or end - p < 2 + mv[p + 1] + 4:
                return pos
            nl = mv[p + 1]
            sub = mv[p + 2 : p + 2 + nl].tobytes().decode("ascii", "replace")
            q = p + 2 + nl + 4
            if sub == "configuration/target-page-bits":
                if end - q < 5:
                    return pos
                bits = BE32.unpack_from(mv, q)[0]
                q += 4
            elif sub == "configuration/capabilities":
                if end - q < 4:
                    return pos
                count = BE32.unpack_from(mv, q)[0]
                q += 4
                caps = []
                for _ in range(count):
                    if end - q < 1 or end - q < 1 + mv[q]:
                        return pos
                    cap = mv[q + 1 : q + 1 + mv[q]].tobytes()
                    if not printable(cap):
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
            self._footers = mv[pos] == SEC_FOOTER
        if not self._footers:
            self._state = S_TOP
            return pos
        if end - pos < 5:
            return pos
        if mv[pos] != SEC_FOOTER:
            raise StreamError(
                f"missing section footer for section '{self._section_name}' at offset {base + pos}"
            )
        sid = BE32.unpack_from(mv, pos + 1)[0]
        if sid != self._section_id:
            raise StreamError(
                f"section footer id {sid} does not match section {self._section_id} "
                f"('{self._section_name}') at offset {base + pos}"
            )
        self._state = S_TOP
        return pos + 5

    def _hold(self, off: int) -> None:
        if self._held_from is None:
            self._held_from = off

    # --- end of input ----------------------------------------------------------------

    def _close(self) -> None:
        state = self._state
        if state == S_HEADER:
            raise StreamError(f"stream ended inside its header (after {self._fed} bytes)")
        if state != S_TAIL or self._skip or self._pushback:
            where = self._where()
            raise StreamError(
                f"stream ended before QEMU's EOF marker (after {self._fed} bytes, {where})"
            )
        self._resolve_tail(bytes(self._tail), self._tail_off)
        self._complete = True

    def _where(self) -> str:
        if self._skip:
            return f"inside {self._skip_what} in section '{self._section_name}'"
        if self._state == S_TOP:
            return "between sections"
        if self._section_name:
            return f"in section '{self._section_name}'"
        return "in the configuration section"
