"""The RAM section: the parser's hot path.

A RAM section is a run of be64 ``offset | flags`` words, most of them page records
(header, then a page) and zero-page records (header, then a fill byte). Long runs of
CONTINUE records of one kind are checked a column at a time (one strided copy of their
headers) instead of record by record, and payloads are skipped by counting: a RAM page
is never copied.
"""

from __future__ import annotations

from typing import Final

from .._errors import StreamError
from ._events import Event, RAMBlock
from ._wire import (
    BE16,
    BE64,
    RAM_COMPRESS_PAGE,
    RAM_CONTINUE,
    RAM_EOS,
    RAM_HOOK,
    RAM_MEM_SIZE,
    RAM_MULTIFD_FLUSH,
    RAM_PAGE,
    RAM_XBZRLE,
    RAM_ZERO,
    S_FOOTER,
    S_RAM,
    XBZRLE_ENCODING,
    printable,
)

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
    _BATCH_MIN. A per-record Python loop costs several times more per record (see
    docs/performance.md)."""
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


class RAMParser:
    """StreamParser's RAM part: page records, and the setup block list."""

    # StreamParser's, shared with the other parts
    _state: int
    _events: list[Event]
    _page_size: int
    _skip: int  # payload bytes still to skip
    _skip_what: str
    _ignore_shared: bool
    _postcopy_advised: bool

    def _init_ram(self) -> None:
        # RAM blocks: name -> [used_length, normal, zero, xbzrle]
        self._blocks: dict[str, list[int]] = {}
        self._cur: list[int] | None = None
        self._cur_name = ""
        self._cur_limit = 0

    def _ram(self, mv: memoryview, pos: int, end: int, base: int) -> int:
        """The hot loop: page records, then whatever ends the section."""
        unpack = BE64.unpack_from
        ps = self._page_size
        mask = ps - 1
        cont_page = RAM_PAGE | RAM_CONTINUE
        cont_zero = RAM_ZERO | RAM_CONTINUE
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
                if new == pos or self._state != S_RAM:
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
        kind = flags & ~RAM_CONTINUE
        if kind in (RAM_PAGE, RAM_ZERO, RAM_XBZRLE):
            p = pos + 8
            if flags & RAM_CONTINUE:
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
                if end - p < (1 if kind == RAM_ZERO else 3 if kind == RAM_XBZRLE else 0):
                    return pos  # keep the record whole: don't switch blocks half-way
                self._cur, self._cur_name, self._cur_limit = block, name, block[0]
            assert self._cur is not None
            if word - flags >= self._cur_limit:
                raise StreamError(
                    f"RAM page offset 0x{word - flags:x} beyond block {self._cur_name!r} "
                    f"(0x{self._cur_limit:x} bytes) at offset {base + pos}"
                )
            if kind == RAM_PAGE:
                self._cur[1] += 1
                p += self._page_size
                if p > end:
                    self._skip = p - end
                    self._skip_what = "a RAM page"
                    return end
                return p
            if kind == RAM_ZERO:
                if end - p < 1:
                    return pos
                if mv[p]:
                    raise StreamError(f"zero page with fill byte {mv[p]} at offset {base + p}")
                self._cur[2] += 1
                return p + 1
            # XBZRLE: u8 encoding, be16 length, encoded data
            if end - p < 3:
                return pos
            if mv[p] != XBZRLE_ENCODING:
                raise StreamError(f"bad XBZRLE encoding {mv[p]} at offset {base + p}")
            ln: int = BE16.unpack_from(mv, p + 1)[0]
            if ln > self._page_size:
                raise StreamError(f"XBZRLE page of {ln} bytes at offset {base + p}")
            self._cur[3] += 1
            p += 3 + ln
            if p > end:
                self._skip = p - end
                self._skip_what = "an XBZRLE page"
                return end
            return p
        if flags == RAM_EOS:
            # Keep the current block: both ends remember it across sections, and QEMU
            # does start a section with a CONTINUE record.
            self._state = S_FOOTER
            return pos + 8
        if flags == RAM_MULTIFD_FLUSH:
            return pos + 8
        if flags == RAM_MEM_SIZE:
            return self._ram_blocks(mv, pos, end, base, word - flags)
        if flags & RAM_COMPRESS_PAGE:
            raise StreamError(
                "compressed RAM pages (the 'compress' capability) are not supported "
                f"(offset {base + pos})"
            )
        if flags & RAM_HOOK:
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
            if ln == 0 or not printable(raw):
                raise StreamError(f"bad RAM block name {raw!r} at offset {base + p}")
            used = BE64.unpack_from(mv, p + 1 + ln)[0]
            p += 1 + ln + 8
            if self._postcopy_advised:
                # Written only for blocks whose page size differs from the host's
                # (huge pages): a power of two, where a name length byte or a flags
                # word would be.
                (maybe,) = BE64.unpack_from(mv, p)
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
