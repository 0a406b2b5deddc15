"""Device state: the sections that are not RAM, delimited after the fact.

Device (FULL) sections are not self-delimiting: their layout is only known from the
JSON description that arrives last. They come after RAM and are small, so the parser
buffers everything from the first device section on (the *tail*) and delimits it at
close: each section ends where the description's next device's header starts (or,
without a description, at a footer that a plausible header follows). The rare non-RAM
sections met while RAM still streams (early-setup devices, other iterables such as
dirty bitmaps) are *opaque*: delimited on the fly by their footer.
"""

from __future__ import annotations

import struct
from typing import Any

from .._errors import StreamError
from ._events import EOF, Configuration, DeviceSection, Event, SectionStart, VMDescription
from ._wire import (
    BE32,
    CMD_HDR,
    COMMANDS,
    MAGIC,
    MAX_TAIL,
    QEMU_VM_FILE_VERSION,
    S_OPAQUE,
    S_TAIL,
    S_TOP,
    SEC_COMMAND,
    SEC_END,
    SEC_EOF,
    SEC_FOOTER,
    SEC_FULL,
    SEC_PART,
    SEC_START,
    SEC_VMDESCRIPTION,
    printable,
)


def section_header(
    mv: memoryview | bytes | bytearray, pos: int, end: int, base: int
) -> tuple[SectionStart, int] | None:
    """START/FULL header at pos: (event, header length), or None if incomplete."""
    if end - pos < 6:
        return None
    ln = mv[pos + 5]
    hlen = 6 + ln + 8
    if end - pos < hlen:
        return None
    raw = bytes(mv[pos + 6 : pos + 6 + ln])
    if ln == 0 or not printable(raw):
        raise StreamError(f"bad section idstr {raw!r} at offset {base + pos}")
    sid = BE32.unpack_from(mv, pos + 1)[0]
    instance, version = struct.unpack_from(">II", mv, pos + 6 + ln)
    kind = "start" if mv[pos] == SEC_START else "full"
    return SectionStart(kind, sid, raw.decode("ascii"), instance, version), hlen


def _runstate(t: bytes, pos: int, size: int) -> str | None:
    """globalstate's payload: be32 length (with the NUL), then a 100-byte buffer."""
    if size < 4 or pos + size > len(t):
        return None
    (n,) = struct.unpack_from(">I", t, pos)
    raw = t[pos + 4 : pos + 4 + min(n, size - 4, 100)].split(b"\0", 1)[0]
    return raw.decode("ascii", "replace") if raw and printable(raw) else None


def _description(raw: bytes) -> dict[str, Any]:
    try:
        import json  # only at the end of a stream: keeps helper start-up short

        desc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StreamError(f"the VM description is not valid JSON: {exc}") from exc
    if not isinstance(desc, dict):
        raise StreamError("the VM description is not a JSON object")
    return desc


def _device_section(t: bytes, p: int, eof: int, base: int) -> tuple[SectionStart, int]:
    """The header of the device section at ``p`` of the tail (only FULL sections come
    after the last RAM section): its start and length."""
    if t[p] != SEC_FULL:
        raise StreamError(
            f"unexpected section type 0x{t[p]:02x} in the device state at offset {base + p}"
        )
    hdr = section_header(t, p, eof, base)
    if hdr is None:
        raise StreamError(f"truncated section header at offset {base + p}")
    return hdr


class DeviceParser:
    """StreamParser's device state part: opaque sections, and the tail."""

    # StreamParser's, shared with the other parts
    _state: int
    _events: list[Event]
    _footers: bool | None  # unknown until the first section ends
    _section_id: int
    _section_name: str
    _open: set[int]  # section ids started and not ended
    _pushback: bytes
    _pb_off: int
    _require_description: bool | None
    _config: Configuration | None
    _packaged: bool

    def _hold(self, off: int) -> None:
        raise NotImplementedError  # StreamParser's

    def _init_devices(self) -> None:
        # Opaque section (footer scan)
        self._op_buf = bytearray()
        self._op_scan = 0
        self._op_off = 0
        self._op_header: SectionStart | None = None
        # Tail
        self._tail = bytearray()
        self._tail_off = -1
        self._eof_offset: int | None = None
        self._description: dict[str, Any] | None = None
        self._runstate: str | None = None

    # --- opaque sections (streamed, delimited by their footer) ----------------------

    def _start_opaque(self, start: SectionStart | None, payload_off: int) -> None:
        if self._footers is False:
            raise StreamError(
                f"cannot delimit section '{self._section_name}' of a stream without section footers"
            )
        self._state = S_OPAQUE
        self._op_buf = bytearray()
        self._op_scan = 0
        self._op_off = payload_off
        self._op_header = start

    def _opaque(self, mv: memoryview, pos: int, end: int, base: int) -> int:
        marker = bytes([SEC_FOOTER]) + BE32.pack(self._section_id)
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
        self._state = S_TOP
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
        if kind in (SEC_START, SEC_FULL):
            if end - p < 6:
                return None
            ln = b[p + 5]
            if end - p < 6 + ln + 8:
                return None
            return ln > 0 and printable(b[p + 6 : p + 6 + ln])
        if kind in (SEC_PART, SEC_END):
            if end - p < 5:
                return None
            return BE32.unpack_from(b, p + 1)[0] in self._open
        if kind == SEC_COMMAND:
            if end - p < 5:
                return None
            _, cmd, ln = CMD_HDR.unpack_from(b, p)
            spec = COMMANDS.get(cmd)
            return spec is not None and spec[1] in (-1, ln)
        if kind == SEC_EOF:
            if end - p < 2:
                return None
            return b[p + 1] == SEC_VMDESCRIPTION
        return False

    # --- tail: device state, EOF, VM description ------------------------------------

    def _start_tail(self, off: int) -> None:
        self._hold(off)
        self._state = S_TAIL
        self._tail_off = off

    def _resolve_tail(self, t: bytes, base: int) -> None:
        found = self._described_end(t, base)
        if found is not None:
            desc, eof, sections = found
        else:
            desc, eof = None, self._bare_end(t, base)
            sections = self._split_by_footers(t, eof, base)
            if self._description_required():
                raise StreamError(
                    f"the VM description is missing after QEMU's EOF marker (after "
                    f"{base + len(t)} bytes): the stream was cut, or the machine runs with "
                    "suppress-vmdesc=on, which cannot be told apart and is not supported"
                )
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

    def _description_required(self) -> bool:
        """Must a VM description follow EOF? QEMU 7.2-10.x write one after every
        migration stream unless the machine's ``suppress-vmdesc`` is on (default off for
        every machine type but Xen's ``xenfv``) or the stream is postcopy's; device-state
        files (``xen-save-devices-state``: no configuration section) never have one.
        Nothing in the stream says the property is on, so without it a stream cut right
        after its EOF byte would pass for complete: such streams are refused."""
        if self._require_description is not None:
            return self._require_description
        cfg = self._config
        if cfg is None or self._packaged:
            return False
        return not cfg.machine_type.startswith("xenfv")

    def _described_end(
        self, t: bytes, base: int
    ) -> tuple[dict[str, Any], int, list[tuple[SectionStart, int, int]]] | None:
        """(description, index of EOF in t, device sections), or None without one.

        The first ``00 06 len {`` whose JSON parses and whose device list delimits the
        sections before it is the end of QEMU's stream: anything after it is a second
        stream or junk, and refused. A device payload could hold such bytes; the device
        list must then also fit, and the error is a refusal, never a false acceptance."""
        truncated: tuple[int, int] | None = None
        q = t.find(b"\x00\x06")
        while q >= 0:
            if len(t) - q >= 7 and t[q + 6] == 0x7B:  # '{'
                ln = BE32.unpack_from(t, q + 2)[0]
                have = len(t) - q - 6
                if ln > have:
                    truncated = (have, ln)
                else:
                    # An exact fit can only be the real description: its errors stand.
                    last = ln == have
                    try:
                        desc = _description(t[q + 6 : q + 6 + ln])
                        sections = self._split_described(t, q, desc, base)
                    except StreamError:
                        if last:
                            raise
                    else:
                        if not last:
                            raise StreamError(
                                f"{have - ln} bytes after the end of QEMU's stream (its VM "
                                f"description ends at offset {base + q + 6 + ln}): one "
                                "stream per image"
                            )
                        return desc, q, sections
            q = t.find(b"\x00\x06", q + 1)
        if truncated is not None and t[-1:] != bytes([SEC_EOF]):
            have, ln = truncated
            raise StreamError(
                f"stream ended inside the VM description ({have} of {ln} bytes, "
                f"after {base + len(t)} bytes)"
            )
        return None

    def _split_described(
        self, t: bytes, eof: int, desc: dict[str, Any], base: int
    ) -> list[tuple[SectionStart, int, int]]:
        devices = desc.get("devices")
        if not isinstance(devices, list):
            raise StreamError("the VM description has no device list")
        try:
            return self._split_by_description(t, eof, devices, base)
        except StreamError:
            if self._footers is not None:
                raise
        self._footers = False  # no section has ended yet: perhaps they have no footers
        try:
            return self._split_by_description(t, eof, devices, base)
        except StreamError:
            self._footers = None
            raise

    def _bare_end(self, t: bytes, base: int) -> int:
        """Index in t of the EOF of a stream without a description: its last byte."""
        if not t or t[-1] != SEC_EOF:
            raise StreamError(
                f"stream ended before QEMU's EOF marker (after {base + len(t)} bytes, "
                f"{self._tail_where(t, base)})"
            )
        # A second stream after the first one's EOF (after a footer, or at once).
        second = MAGIC + BE32.pack(QEMU_VM_FILE_VERSION)
        i = t.find(bytes([SEC_EOF]) + second)
        while i >= 0:
            if i == 0 or self._footers is False or t[i - 5] == SEC_FOOTER:
                raise StreamError(
                    f"{len(t) - i - 1} bytes after the end of QEMU's stream (another stream "
                    f"starts at offset {base + i + 1}): one stream per image"
                )
            i = t.find(bytes([SEC_EOF]) + second, i + 1)
        return len(t) - 1

    def _tail_where(self, t: bytes, base: int) -> str:
        """Name the device section an incomplete tail ended in, by footer scanning."""
        p = 0
        name = ""
        while p < len(t) and t[p] == SEC_FULL:
            hdr = section_header(t, p, len(t), base)
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
        marker = bytes([SEC_FOOTER]) + BE32.pack(sid)
        i = t.find(marker, p, limit)
        while i >= 0:
            after = i + 5
            if after == limit:
                return after
            if t[after] == SEC_FULL and self._plausible_next(t, after, limit):
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
            start, hlen = _device_section(t, p, eof, base)
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
            start, hlen = _device_section(t, p, eof, base)
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
                pat = bytes([len(nname)]) + nname.encode() + BE32.pack(ninst)
                h = -1
                i = t.find(pat, body, eof)
                while i >= 0:
                    c = i - 5  # the header's type byte
                    if c - foot >= body and t[c] == SEC_FULL and self._footer_ok(t, c, start, foot):
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
        return t[h - 5] == SEC_FOOTER and BE32.unpack_from(t, h - 4)[0] == start.section_id
