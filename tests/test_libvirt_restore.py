"""Restoring libvirt save images (``virsh save`` files) into real QEMU destinations.

The images are built around real QEMU streams with
``vmtransport.image._libvirt.build_libvirt_header``, compressed as libvirt does it
(format 1-5) with the real programs or Python's own modules, and restored with
``-incoming "exec:vmtransport restore file:IMG"``; the destination's RAM must equal the
source's. The raw format runs on QEMU 7.2 and 10.0 (the 64 MiB random-RAM save of
the ``saved`` fixture); the compressed ones on QEMU 10.0, from a VM whose RAM is 8 MiB of
random bytes and zeros after (so that bzip2 and xz take well under a second).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
from helpers import (
    MEM_MIB,
    VMT,
    Saved,
    failed_load,
    load,
    one_error_line,
    restore_cmd,
    wait_for,
)
from qemuvm import VM, describe_difference, files_equal, make_ram_file

from vmtransport._usecases import REFUSED
from vmtransport.image._libvirt import HEADER_SIZE, build_libvirt_header

XML = """<domain type='kvm'>
  <name>guest-{name}</name>
  <uuid>6b0b7c2e-3f59-4c52-9a8e-2d1a3e6f0c11</uuid>
  <memory unit='KiB'>65536</memory>
</domain>"""
COOKIE = "<qemuDomainSaveCookie><cpu mode='custom'/></qemuDomainSaveCookie>"
OTHER_ORDER: Literal["little", "big"] = "big" if sys.byteorder == "little" else "little"
COMPRESSED_ON = "10.0"


def tool(*argv: str) -> Callable[[bytes], bytes]:
    def run(data: bytes) -> bytes:
        return subprocess.run(argv, input=data, capture_output=True, check=True, timeout=120).stdout

    return run


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda d: gzip.compress(d, compresslevel=1),
    "bzip2": lambda d: bz2.compress(d, compresslevel=1),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, preset=0),
    "lzop": tool("lzop", "-c", "-1"),
    "zstd": tool("zstd", "-c", "-1", "-q"),
}
MAGICS = {
    "gzip": b"\x1f\x8b",
    "bzip2": b"BZh",
    "xz": b"\xfd7zXZ\0",
    "lzop": b"\x89LZO\0",
    "zstd": b"\x28\xb5\x2f\xfd",
}


_SPARSE: dict[str, tuple[Path, Path]] = {}


def sparse_saved(qemu: str, factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source RAM file, QEMU's stream via exec:cat) of a VM whose RAM is mostly zeros."""
    if qemu in _SPARSE:
        return _SPARSE[qemu]
    d = factory.mktemp("sparse-src")
    ram = d / "src.ram"
    make_ram_file(ram, 8, random=True)
    with open(ram, "r+b") as f:
        f.truncate(MEM_MIB << 20)
    stream = d / "vm.cat"
    with VM(qemu, d, name="src", mem_mib=MEM_MIB, ram_file=ram, paused=True) as vm:
        vm.migrate(f"exec:cat > {stream}")
        assert vm.wait_migration(timeout=120)["status"] == "completed", vm.log()
    wait_for([stream])
    _SPARSE[qemu] = (ram, stream)
    return ram, stream


@pytest.fixture
def sparse(
    qemu_cmds: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    return sparse_saved(qemu_cmds[COMPRESSED_ON], tmp_path_factory)


def inspect_json(path: Path) -> dict[str, object]:
    r = subprocess.run([VMT, "inspect", "--json", str(path)], capture_output=True, timeout=120,
                       check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict)
    return doc


def check_inspect(path: Path, *, name: str, compression: str, was_running: bool) -> None:
    doc = inspect_json(path)
    assert doc["format"] == "libvirt-save-image"
    assert doc["complete"] is True and doc["problems"] == []
    lv = doc["libvirt"]
    assert isinstance(lv, dict)
    assert lv["domain_name"] == f"guest-{name}"
    assert lv["compression"] == compression
    assert lv["was_running"] is was_running
    assert lv["partial"] is False and lv["version"] == 2
    assert lv["stream_offset"] == HEADER_SIZE + lv["data_len"]
    stream = doc["stream"]
    assert isinstance(stream, dict) and stream["complete"] is True


def test_raw_libvirt_image(saved: Saved, tmp_path: Path) -> None:
    """Format 0 around the 64 MiB random-RAM stream, on both QEMUs; the cookie is skipped."""
    image = tmp_path / "vm.lv"
    with open(image, "wb") as f:
        f.write(build_libvirt_header(XML.format(name="raw"), was_running=True, cookie=COOKIE))
        f.write(saved.cat.read_bytes())
    check_inspect(image, name="raw", compression="raw", was_running=True)
    err = tmp_path / "restore.err"
    dst = load(saved.qemu, tmp_path, restore_cmd(f"file:{image}", err))
    assert err.read_text() == ""
    assert files_equal(saved.src_ram, dst), describe_difference(saved.src_ram, dst)


@pytest.mark.parametrize("fmt", list(COMPRESSORS))
def test_compressed_libvirt_image(
    qemu_cmds: dict[str, str], sparse: tuple[Path, Path], tmp_path: Path, fmt: str
) -> None:
    src_ram, stream = sparse
    packed = COMPRESSORS[fmt](stream.read_bytes())
    assert packed.startswith(MAGICS[fmt])
    image = tmp_path / f"vm.{fmt}"
    image.write_bytes(build_libvirt_header(XML.format(name=fmt), was_running=False,
                                           format=fmt) + packed)  # fmt: skip
    check_inspect(image, name=fmt, compression=fmt, was_running=False)
    err = tmp_path / "restore.err"
    dst = load(qemu_cmds[COMPRESSED_ON], tmp_path, restore_cmd(f"file:{image}", err))
    assert err.read_text() == ""
    assert files_equal(src_ram, dst), describe_difference(src_ram, dst)


def test_byte_swapped_header(
    qemu_cmds: dict[str, str], sparse: tuple[Path, Path], tmp_path: Path
) -> None:
    """A header written on a host of the other byte order (with a zstd payload, so the
    format field must be read right too)."""
    src_ram, stream = sparse
    head = build_libvirt_header(XML.format(name="swapped"), was_running=True, format="zstd",
                                cookie=COOKIE, byteorder=OTHER_ORDER)  # fmt: skip
    image = tmp_path / "vm.swapped"
    image.write_bytes(head + COMPRESSORS["zstd"](stream.read_bytes()))
    check_inspect(image, name="swapped", compression="zstd", was_running=True)
    err = tmp_path / "restore.err"
    dst = load(qemu_cmds[COMPRESSED_ON], tmp_path, restore_cmd(f"file:{image}", err))
    assert err.read_text() == ""
    assert files_equal(src_ram, dst), describe_difference(src_ram, dst)


@pytest.mark.fault(
    "libvirt image: magic LibvirtQemudPart (never finished)",
    direction="restore",
    vm="QEMU gets the refusal marker, not one byte of the stream",
    disk="n/a",
    exit="1 (restore and verify)",
    message="names the image: 'partial', 'LibvirtQemudPart'",
)
def test_partial_libvirt_image_is_refused(sparse: tuple[Path, Path], tmp_path: Path) -> None:
    """LibvirtQemudPart: libvirt never finished writing it. Not one byte goes out."""
    _, stream = sparse
    image = tmp_path / "vm.part"
    image.write_bytes(
        build_libvirt_header(XML.format(name="part"), was_running=True, partial=True)
        + stream.read_bytes()
    )
    r = subprocess.run([VMT, "restore", f"file:{image}"], capture_output=True, timeout=60,
                       check=False)  # fmt: skip
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert "partial" in line and "LibvirtQemudPart" in line and str(image) in line, line
    assert r.stdout == REFUSED  # a QEMU reading this fails its load instead of waiting
    doc = inspect_json(image)
    assert doc["complete"] is False
    lv = doc["libvirt"]
    assert isinstance(lv, dict) and lv["partial"] is True and lv["domain_name"] == "guest-part"
    r = subprocess.run([VMT, "verify", str(image)], capture_output=True, timeout=60, check=False)
    assert r.returncode == 1 and "partial" in one_error_line(r.stderr)


@pytest.mark.fault(
    "libvirt image: payload (gzip) cut short",
    direction="restore",
    vm="destination QEMU's load fails (exit 1)",
    disk="n/a",
    exit="QEMU exits 1",
    message="one line naming the image",
)
def test_corrupt_compressed_payload_fails_the_load(
    qemu_cmds: dict[str, str], sparse: tuple[Path, Path], tmp_path: Path
) -> None:
    """A gzip payload cut short: the decompressor's failure fails QEMU's load."""
    _, stream = sparse
    packed = COMPRESSORS["gzip"](stream.read_bytes())
    image = tmp_path / "vm.gz-cut"
    image.write_bytes(
        build_libvirt_header(XML.format(name="cut"), was_running=True, format="gzip")
        + packed[: len(packed) * 2 // 3]
    )
    err = tmp_path / "restore.err"
    failed_load(qemu_cmds[COMPRESSED_ON], tmp_path, restore_cmd(f"file:{image}", err))
    line = one_error_line(err.read_text())
    assert str(image) in line, line
