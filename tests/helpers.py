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
from vmtransport._pagecache import cached_bytes

VMT = Path(sys.executable).parent / "vmtransport"
DATA = Path(__file__).parent / "data"
TIMEOUT = 60
HEADER_SIZE = 65536
MEM_MIB = 64


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
        at = data.find(page, HEADER_SIZE)
        assert at > 0 and data.find(page, at + 1) < 0
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
