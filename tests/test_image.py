"""The vmtransport image format and what ``vmtransport save`` accepts, on real QEMU streams.

The streams are the real QEMU 7.2 and 10.0 migration streams of tests/data (see
test_stream_parser.py); the tests with live QEMUs are in test_qemu_images.py. Headers are
parsed with ``struct`` (tests/helpers.py), independently of
``vmtransport.image.ImageHeader``, by the layout docs/image-format.md gives.

* A save refuses what is not a QEMU stream at its first bytes, and a stream cut before
  QEMU's EOF (and VM description) anywhere: exit 1, one line, nothing under the final
  name and no temporary.
* A complete stream becomes an image whose every header field is what the format says.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    HEADER_SIZE,
    VMT,
    check_complete_image,
    description_at_end,
    listing,
    load_stream,
    one_error_line,
    parse_header,
    vmt,
)

import vmtransport
from vmtransport._buffers import BUFFER_SIZE
from vmtransport._usecases import REFUSED
from vmtransport.image._libvirt import build_libvirt_header

# Real QEMU streams: machine types pc (i440fx) and q35, QEMU 7.2 and 10.0.
STREAMS = ["qemu7.2-pc", "qemu7.2-q35", "qemu7.2-ignore-shared", "qemu10.0-pc", "qemu10.0-q35"]
SINKS = ["file", "odirect", "file,format=raw"]


# --- save: refuse what is not QEMU's stream, and streams that end early -----------------


@pytest.mark.parametrize(
    "junk",
    [
        b"x" * 100,
        b"QEVN\0\0\0\3",  # one bit off QEMU's magic
        b"\x7fELF\2\1\1\0",
        b"VMTIMAGE" + bytes(100),  # an image is not a stream: restore reads images, save not
        build_libvirt_header("<domain><name>a</name></domain>", was_running=True)[:200],
    ],
    ids=["text", "near-magic", "elf", "vmtransport-image", "libvirt-image"],
)
@pytest.mark.fault(
    "a few bytes that are not a QEMU stream, producer still open",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="nothing in the target directory",
    exit="1 within 5 s",
    message="names the image: 'not a QEMU migration stream'",
)
def test_save_refuses_non_qemu_data_at_once(tmp_path: Path, junk: bytes) -> None:
    """A few bytes of junk, and the producer keeps its end open: the helper must not wait
    for more (a buffer to fill, or EOF) before refusing."""
    out = tmp_path / "out"
    out.mkdir()
    image = out / "vm.sav"
    helper = subprocess.Popen(
        [str(VMT), "save", f"file:{image}"], stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert helper.stdin is not None and helper.stderr is not None
    try:
        helper.stdin.write(junk)
        helper.stdin.flush()
        start = time.monotonic()
        rc = helper.wait(timeout=10)  # the pipe is still open
        assert time.monotonic() - start < 5
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        helper.stdin.close()
    line = one_error_line(helper.stderr.read())
    helper.stderr.close()
    assert rc == 1
    assert "not a QEMU migration stream" in line and str(image) in line
    assert listing(out) == [], "file or temporary left"


@pytest.mark.fault(
    "endless input that is not a QEMU stream",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="nothing in the target directory",
    exit="1, before 8 MiB are read",
    message="'not a QEMU migration stream'",
)
def test_save_refuses_an_endless_non_qemu_stream_without_reading_it_all(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    image = out / "vm.sav"
    helper = subprocess.Popen(
        [str(VMT), "save", f"odirect:{image}"], stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert helper.stdin is not None and helper.stderr is not None
    sent = 0
    pipe = helper.stdin

    def produce() -> None:
        nonlocal sent
        chunk = os.urandom(1 << 20)
        try:
            while sent < 4 << 30:
                pipe.write(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ValueError, OSError):
            pass

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        rc = helper.wait(timeout=20)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
    producer.join(timeout=20)
    assert not producer.is_alive()
    pipe.close()
    line = one_error_line(helper.stderr.read())
    helper.stderr.close()
    assert rc == 1 and "not a QEMU migration stream" in line
    # Refused at its first read: well before the pump's first 8 MiB buffer is full.
    assert sent < BUFFER_SIZE, f"the helper read {sent} bytes of junk before refusing"
    assert listing(out) == []


def cuts(stream: bytes) -> dict[str, int]:
    """Where to cut a real stream: every cut is before QEMU's EOF, right after it (the
    VM description lost) or inside the VM description that follows it."""
    eof, _ = description_at_end(stream)
    return {
        "empty": 0,
        "in-configuration": 12,
        "in-ram-setup": 60,
        "mid-ram": len(stream) // 2,
        "in-device-state": eof - 700,
        "just-before-eof": eof,
        "eof-only-description-lost": eof + 1,
        "description-type-only": eof + 2,
        "in-description-json": eof + 6 + 40,
        "last-byte-missing": len(stream) - 1,
    }


@pytest.mark.parametrize("name", ["qemu7.2-pc", "qemu10.0-q35"])
@pytest.mark.fault(
    "stream truncated at 10 points (configuration, RAM, device state, EOF, VM description)",
    direction="save",
    vm="n/a (stream from a pipe, no VM)",
    disk="nothing in the target directory",
    exit="1",
    message="names the URI: 'incomplete migration stream', 'after N bytes'",
)
def test_save_refuses_truncated_stream(tmp_path: Path, name: str) -> None:
    """Every cut into an image on file:, three of them into odirect: and raw targets too:
    exit 1 with one line, and the target directory stays empty. The helpers run
    concurrently."""
    stream, _ = load_stream(name)
    jobs = [
        (sink, what, cut)
        for sink in SINKS
        for what, cut in cuts(stream).items()
        if sink == "file" or what in ("mid-ram", "just-before-eof", "in-description-json")
    ]

    def run(job: tuple[str, str, int]) -> tuple[str, str, int, int, bytes, list[str]]:
        sink, what, cut = job
        out = tmp_path / f"{sink.replace(',', '-')}-{what}"
        out.mkdir()
        kind, _, options = sink.partition(",")
        uri = f"{kind}:{out / 'vm.sav'}" + (f",{options}" if options else "")
        r = vmt("save", uri, input=stream[:cut])
        return uri, what, cut, r.returncode, r.stderr, listing(out)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, jobs))
    assert len(results) == len(cuts(stream)) + 3 * (len(SINKS) - 1)
    for uri, what, cut, rc, stderr, left in results:
        assert rc == 1, (uri, what, stderr)
        line = one_error_line(stderr)
        assert uri in line and "incomplete migration stream" in line, (what, line)
        assert f"after {cut} bytes" in line, (what, line)  # where it ended
        if "description" in what or what == "last-byte-missing":
            assert "VM description" in line or "EOF marker" in line, (what, line)
        assert left == [], f"{uri} cut {what}: {left} left behind"
    # The same targets take the whole stream.
    for sink in SINKS:
        kind, _, options = sink.partition(",")
        out = tmp_path / f"whole-{kind}"
        out.mkdir(exist_ok=True)
        uri = f"{kind}:{out / 'vm.sav'}" + (f",{options}" if options else "")
        r = vmt("save", uri, input=stream)
        assert r.returncode == 0, r.stderr
        assert listing(out) == ["vm.sav"]


# --- the image ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
def test_image_header_fields(tmp_path: Path, name: str) -> None:
    stream, meta = load_stream(name)
    image = tmp_path / "vm.sav"
    r = vmt("save", f"file:{image}", "--name", "web1", input=stream)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    assert image.stat().st_mode & 0o777 == 0o600
    h = check_complete_image(image, stream)
    assert h.metadata["name"] == "web1"
    s = h.metadata["stream"]
    assert s["machine_type"] == meta["machine_type"]
    assert {b["name"]: b["used_length"] for b in s["ram_blocks"]} == meta["ramblocks"]
    assert s["ram_total_bytes"] == sum(meta["ramblocks"].values())
    assert s["runstate"] == "prelaunch"  # the fixtures' sources ran with -S
    assert s["vm_description"] is True
    # A restore gives back QEMU's bytes exactly.
    r = vmt("restore", f"file:{image}")
    assert r.returncode == 0 and r.stderr == b""
    assert r.stdout == stream


def test_unnamed_save_has_null_name(tmp_path: Path) -> None:
    stream, _ = load_stream("qemu10.0-pc")
    image = tmp_path / "vm.sav"
    assert vmt("save", f"odirect:{image}", input=stream).returncode == 0
    h = check_complete_image(image, stream)
    assert h.metadata["name"] is None


@pytest.mark.parametrize("kind", ["file", "odirect"])
def test_raw_format_writes_the_bare_stream(tmp_path: Path, kind: str) -> None:
    stream, _ = load_stream("qemu7.2-q35")
    raw = tmp_path / "vm.raw"
    r = vmt("save", f"{kind}:{raw},format=raw", input=stream)
    assert r.returncode == 0, r.stderr
    assert raw.read_bytes() == stream
    assert raw.read_bytes()[:4] == b"QEVM"
    assert raw.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("kind", "offset"), [("file", 12345), ("odirect", 8192)])
def test_offset_images(tmp_path: Path, kind: str, offset: int) -> None:
    """``offset=N``: the bytes before N are kept, the image starts at N, everything after
    it is the image; restore, inspect and verify read it there."""
    stream, meta = load_stream("qemu10.0-pc")
    path = tmp_path / "disk.bin"
    prefix = os.urandom(offset)
    path.write_bytes(prefix + b"old contents to be replaced" * 1000)
    uri = f"{kind}:{path},offset={offset}"
    r = vmt("save", uri, "--name", "at-offset", input=stream)
    assert r.returncode == 0, r.stderr
    assert path.read_bytes()[:offset] == prefix
    h = check_complete_image(path, stream, offset)
    assert h.metadata["name"] == "at-offset"
    assert h.metadata["stream"]["machine_type"] == meta["machine_type"]
    r = vmt("restore", uri)
    assert r.returncode == 0 and r.stdout == stream, r.stderr
    r = vmt("verify", uri)
    assert r.returncode == 0, r.stderr
    r = vmt("inspect", "--json", uri)
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert doc["complete"] and doc["image"]["metadata"]["name"] == "at-offset"
    # Without the offset the file is not an image.
    r = vmt("restore", f"file:{path}")
    assert r.returncode == 1 and r.stdout == REFUSED


def test_header_decoder_agrees_with_struct_parse(tmp_path: Path) -> None:
    """vmtransport's own decoder reads the same fields the struct parse above reads."""
    from vmtransport.image import ImageHeader

    stream, _ = load_stream("qemu7.2-pc")
    image = tmp_path / "vm.sav"
    assert vmt("save", f"file:{image}", "--name", "web1", input=stream).returncode == 0
    head = image.read_bytes()[:HEADER_SIZE]
    ours = parse_header(head)
    theirs = ImageHeader.decode(head)
    assert (theirs.state, theirs.payload_length, theirs.checksum, theirs.eof_offset) == (
        ours.state, ours.payload_length, ours.checksum, ours.eof_offset,
    )  # fmt: skip
    assert theirs.metadata == ours.metadata
    assert theirs.encode() == head


# --- the checksum from the reader ---------------------------------------------------------


def _image_writer(path: Path) -> Any:
    from vmtransport._registry import get_registry
    from vmtransport.image import ImageWriter, save_sink

    sink = save_sink(get_registry().resolve(f"odirect:{path}"), None)
    assert isinstance(sink, ImageWriter)
    return sink


def test_image_takes_the_checksum_its_reader_computed(tmp_path: Path) -> None:
    """A save helper's reader hashes the stream as it reads it (see BlockingReader); the
    image carries that checksum, and one that does not cover exactly the bytes written
    fails the save: no image."""
    from vmtransport._buffers import Checksum

    stream, _ = load_stream("qemu7.2-pc")
    image = tmp_path / "vm.sav"
    writer = _image_writer(image)
    checksum = Checksum()
    writer.use_checksum(checksum)
    for pos in range(0, len(stream), BUFFER_SIZE):
        piece = memoryview(stream)[pos : pos + BUFFER_SIZE]
        checksum.update(piece)
        writer.write(piece)
    writer.commit()
    check_complete_image(image, stream)

    short = tmp_path / "short.sav"
    writer = _image_writer(short)
    checksum = Checksum()
    writer.use_checksum(checksum)
    checksum.update(memoryview(stream)[:-1])
    writer.write(memoryview(stream))
    with pytest.raises(vmtransport.TransportError, match="checksum covers"):
        writer.commit()
    writer.abort()
    assert listing(tmp_path) == ["vm.sav"]

    late = _image_writer(tmp_path / "late.sav")
    late.write(memoryview(stream)[:BUFFER_SIZE])
    with pytest.raises(ValueError, match="from its start"):
        late.use_checksum(Checksum())
    late.abort()
