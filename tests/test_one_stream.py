"""One stream per image (issue 11, point 3), on real QEMU 7.2 and 10.0 streams and
synthetic ones.

* Bytes after the end of QEMU's stream (EOF and its VM description) are refused: by the
  parser, by ``save`` (exit 1, one line, nothing left under the final name), by ``verify``
  and by ``restore`` of a hand-built image holding two streams.
* A migration stream cut right after its EOF byte (the VM description lost) is refused:
  QEMU 7.2 and 10.0 write one unless the machine's ``suppress-vmdesc`` is on, which the
  stream cannot tell from a cut. Device-state files (no configuration section) have none.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import xxhash
from helpers import VMT, description_at_end, listing, load_stream, one_error_line, vmt

from vmtransport import StreamError
from vmtransport.image._header import STATE_COMPLETE, ImageHeader
from vmtransport.stream import StreamParser, VMDescription
from vmtransport.testing import SyntheticStream

REAL = ["qemu7.2-pc", "qemu10.0-q35"]
AFTER_END = "bytes after the end of QEMU's stream"


def stream(name: str) -> bytes:
    if name == "synthetic":
        return bytes(SyntheticStream(300, zero_fraction=0.5))
    return load_stream(name)[0]


def parse(data: bytes, **kw: bool | None) -> StreamParser:
    p = StreamParser(**kw)  # type: ignore[arg-type]
    p.feed(data)
    p.close()
    return p


@pytest.mark.parametrize("name", [*REAL, "synthetic"])
@pytest.mark.fault(
    "two streams concatenated (cat s s), parser",
    direction="save",
    vm="n/a (the stream parser)",
    disk="n/a",
    exit="StreamError",
    message="'N bytes after the end of QEMU's stream', 'ends at offset N'",
)
def test_parser_refuses_what_follows_the_end(name: str) -> None:
    s = stream(name)
    eof, _ = description_at_end(s)
    assert parse(s).complete
    for extra in (s, b"\x00", b"x" * 3, s[: len(s) // 2]):
        with pytest.raises(StreamError, match=f"{len(extra)} {AFTER_END}") as info:
            parse(s + extra)
        assert f"ends at offset {len(s)}" in str(info.value)
    # cut right after EOF: the description is lost
    with pytest.raises(StreamError, match="VM description is missing after QEMU's EOF"):
        parse(s[: eof + 1])


def test_device_state_files_have_no_description() -> None:
    d = stream("qemu7.2-devstate")
    p = parse(d)
    assert p.complete and p.description is None and p.configuration is None
    with pytest.raises(StreamError, match=f"{len(d)} {AFTER_END}"):
        parse(d + d)


@pytest.mark.fault(
    "no VM description (suppress-vmdesc), then a second stream",
    direction="save",
    vm="n/a (the stream parser)",
    disk="n/a",
    exit="StreamError unless the caller says the machine suppresses it; the second stream always",
    message="'VM description is missing' / 'N bytes after the end of QEMU's stream'",
)
def test_suppressed_description_when_the_caller_says_so() -> None:
    """suppress-vmdesc=on: QEMU writes nothing after EOF; accepted only when told, and
    a second stream after it is refused all the same."""
    s = bytes(SyntheticStream(40, description=False))
    with pytest.raises(StreamError, match="VM description is missing"):
        parse(s)
    p = parse(s, require_description=False)
    assert p.complete and p.eof_offset == len(s) - 1
    with pytest.raises(StreamError, match=f"{len(s)} {AFTER_END}"):
        parse(s + s, require_description=False)
    # Xen's machine types suppress it by default.
    x = bytes(SyntheticStream(40, description=False, machine="xenfv-4.2"))
    assert parse(x).complete


@pytest.mark.parametrize("name", [*REAL, "synthetic"])
@pytest.mark.fault(
    "two streams concatenated (cat s s)",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="nothing in the target directory",
    exit="1",
    message="names the URI: 'N bytes after the end of QEMU's stream'",
)
@pytest.mark.fault(
    "junk after the VM description",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="nothing in the target directory",
    exit="1",
    message="names the URI: 'N bytes after the end of QEMU's stream'",
)
@pytest.mark.fault(
    "stream cut right after QEMU's EOF marker (VM description lost)",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="nothing in the target directory",
    exit="1",
    message="names the URI: 'VM description is missing'",
)
def test_save_refuses_two_streams(tmp_path: Path, name: str) -> None:
    s = stream(name)
    eof, _ = description_at_end(s)
    cases = {
        "cat-s-s": s + s,
        "junk-after-description": s + b"\x00junk",
        "cut-after-eof": s[: eof + 1],
    }
    for what, data in cases.items():
        for kind in ("file", "odirect"):
            out = tmp_path / f"{what}-{kind}"
            out.mkdir()
            uri = f"{kind}:{out / 'two.sav'}"
            r = vmt("save", uri, input=data)
            assert r.returncode == 1, (what, r.stderr)
            line = one_error_line(r.stderr)
            assert uri in line, line
            if what == "cut-after-eof":
                assert "VM description is missing" in line, line
            else:
                assert f"{len(data) - len(s)} {AFTER_END}" in line, line
            assert listing(out) == [], f"{what}: {listing(out)} left behind"


def two_stream_image(path: Path, s: bytes, recorded: str = "first") -> None:
    """An image whose header is right in every field for a payload of two streams; its
    recorded EOF offset is the first stream's EOF, or the second's."""
    payload = s + s
    eof, _ = description_at_end(s)
    if recorded == "second":
        eof += len(s)
    header = ImageHeader(STATE_COMPLETE, len(payload), xxhash.xxh3_128(payload).digest(), eof, {})
    path.write_bytes(header.encode() + payload)


def device_state_start(s: bytes) -> int:
    """Where the device state after RAM starts (by hand: after the footer of RAM's last
    section; RAM's section id is in its START section, 0x01 id 0x03 "ram")."""
    ram = s.find(b"\x03ram\x00\x00\x00\x00")
    return s.rfind(b"\x7e" + s[ram - 4 : ram], 0, description_at_end(s)[0]) + 5


@pytest.mark.parametrize("recorded", ["first", "second"])
@pytest.mark.parametrize("name", REAL)
@pytest.mark.fault(
    "image holding two streams (header right for both, EOF recorded at either)",
    direction="restore",
    vm="QEMU gets nothing of the first stream's device state, let alone its EOF marker",
    disk="n/a",
    exit="1 (verify and restore)",
    message="'N bytes after the end of QEMU's stream'",
)
def test_verify_and_restore_refuse_an_image_of_two_streams(
    tmp_path: Path, name: str, recorded: str
) -> None:
    """Also when the recorded EOF offset points at the second stream's EOF: where to
    stop is the parser's business, not the header's."""
    s = stream(name)
    img = tmp_path / "two.sav"
    two_stream_image(img, s, recorded)
    r = vmt("verify", str(img))
    assert r.returncode == 1 and r.stdout == b""
    assert f"{len(s)} {AFTER_END}" in one_error_line(r.stderr)
    # restore: the checksum holds, but QEMU is given nothing of the first stream's
    # device state, let alone its end
    restore = subprocess.run(
        [str(VMT), "restore", f"file:{img}"], capture_output=True, timeout=60, check=False
    )
    assert restore.returncode == 1
    assert f"{len(s)} {AFTER_END}" in one_error_line(restore.stderr)
    assert restore.stdout == s[: device_state_start(s)], "QEMU was given device state"


@pytest.mark.fault(
    "image holding two streams (header right for both)",
    direction="inspect/verify",
    vm="n/a",
    disk="n/a",
    exit="inspect --json: complete false",
    message="problems: 'bytes after the end of QEMU's stream'; checksum_ok true",
)
def test_inspect_says_not_complete(tmp_path: Path) -> None:
    s = stream("qemu10.0-pc")
    img = tmp_path / "two.sav"
    two_stream_image(img, s)
    import json

    r = vmt("inspect", "--json", str(img))
    doc = json.loads(r.stdout)
    assert doc["complete"] is False and doc["stream"]["complete"] is False
    assert any(AFTER_END in p for p in doc["problems"]), doc["problems"]
    assert doc["image"]["checksum_ok"] is True  # the checksum alone would pass it


def test_description_event_only_for_the_real_end() -> None:
    s = stream("qemu7.2-q35")
    p = StreamParser()
    events = p.feed(s) + p.close()
    assert sum(isinstance(e, VMDescription) for e in events) == 1
    assert p.eof_offset == description_at_end(s)[0]


@pytest.mark.fault(
    "QEMU with suppress-vmdesc=on: no VM description",
    direction="save",
    vm="not checked",
    disk="nothing in the target directory",
    exit="not checked",
    message="'VM description is missing', 'suppress-vmdesc=on'",
)
def test_real_qemu_with_suppress_vmdesc(qemu: str, tmp_path: Path) -> None:
    """QEMU 7.2 and 10.0 with ``suppress-vmdesc=on`` write nothing after EOF: the
    stream is what a cut one looks like, so ``save`` refuses it and says why; the same
    stream is complete to a parser told that the machine suppresses the description."""
    import shlex
    import time

    from qemuvm import VM

    raw, out, err = tmp_path / "vm.cat", tmp_path / "out", tmp_path / "save.err"
    out.mkdir()
    v = shlex.quote(str(VMT))
    cmd = f"tee {raw} | {v} save file:{out / 'vm.sav'} 2>{err}"
    with VM(qemu, tmp_path, name="src", machine="pc,suppress-vmdesc=on", paused=True) as vm:
        vm.migrate("exec:" + cmd)
        vm.wait_migration(timeout=120)
    deadline = time.monotonic() + 30
    while not err.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)  # the helper may still be exiting
    data = raw.read_bytes()
    p = parse(data, require_description=False)
    assert p.complete and p.description is None and p.eof_offset == len(data) - 1
    line = one_error_line(err.read_text())
    assert "VM description is missing" in line and "suppress-vmdesc=on" in line, line
    assert listing(out) == []


@pytest.mark.fault(
    "two streams concatenated, the second bigger than the device-state buffer",
    direction="save",
    vm="n/a (the stream parser)",
    disk="n/a",
    exit="StreamError",
    message="'bytes after the end of QEMU's stream (another stream starts at offset N'",
)
def test_two_big_streams_are_refused_for_what_they_are() -> None:
    """A second stream whose RAM overflows the device-state buffer is named as such."""
    s = SyntheticStream(18000, distinct_pages=4)  # 70 MiB of RAM
    p = StreamParser()
    with pytest.raises(StreamError, match=f"{AFTER_END} \\(another stream starts at offset"):
        for _ in range(2):
            for chunk in s.chunks():
                p.feed(chunk)
        p.close()
