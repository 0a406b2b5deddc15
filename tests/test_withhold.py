"""What a restore hands QEMU before the image is proven (issue 11, point 1), in process
and through the CLI, on the real QEMU 7.2 and 10.0 streams of tests/data. (The same
with real QEMU destinations: tests/test_flips.py.)

* A section-type byte turned into QEMU's EOF marker (0x00) makes QEMU finish its load
  right there, wherever it is: nothing from that byte on may reach QEMU before the
  checksum holds, and it does not hold.
* When the consumer stops reading early (QEMU refused something), the restore still
  reads and verifies the rest, and says what was wrong: the checksum, or (the image
  being intact) that the consumer refused it; never only "Broken pipe".
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
from helpers import VMT, load_stream, one_error_line

import vmtransport
from vmtransport import StreamError, TransportError
from vmtransport.image._header import HEADER_SIZE
from vmtransport.image._reader import Holdback
from vmtransport.testing import Device, StreamWriter, SyntheticStream

REAL = ["qemu7.2-pc", "qemu10.0-q35"]
#: more than any pipe holds (a restore grows its pipe to 1 MiB): the consumer's leaving
#: shows as EPIPE mid-stream, not only at the end
BIG = "synthetic-16MiB"


def ram_section_starts(s: bytes) -> list[int]:
    """Offsets of RAM's PART and END section headers (0x02/0x03, be32 id), found by
    hand: RAM's id is in its START section (0x01, id, 0x03 "ram", be32 instance 0)."""
    ram = s.find(b"\x03ram\x00\x00\x00\x00")
    sid = s[ram - 4 : ram]
    found = []
    for kind in (b"\x02", b"\x03"):
        at = s.find(kind + sid)
        while at >= 0:
            found.append(at)
            at = s.find(kind + sid, at + 1)
    return sorted(found)


def image_of(tmp_path: Path, name: str) -> tuple[Path, bytes]:
    s = bytes(SyntheticStream(4096, distinct_pages=64)) if name == BIG else load_stream(name)[0]
    raw = tmp_path / f"{name}.raw"
    raw.write_bytes(s)
    img = tmp_path / f"{name}.sav"
    with raw.open("rb") as f:
        vmtransport.save_fd(f"file:{img}", f.fileno())
    return img, s


def restore_into(uri: str, out: Path) -> tuple[Exception | None, bytes]:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        vmtransport.restore_fd(uri, fd)
        error = None
    except vmtransport.VMTransportError as exc:
        error = exc
    finally:
        os.close(fd)
    return error, out.read_bytes()


@pytest.mark.fault(
    "a section-type byte turned into QEMU's EOF marker",
    direction="restore",
    vm="QEMU is given nothing from that byte on: it cannot finish the load",
    disk="image unchanged",
    exit="1",
    message="checksum mismatch: the image is corrupt; QEMU was not given the end",
)
@pytest.mark.parametrize("name", REAL)
def test_an_early_eof_marker_never_reaches_qemu(tmp_path: Path, name: str) -> None:
    img, s = image_of(tmp_path, name)
    good = img.read_bytes()
    starts = ram_section_starts(s)
    assert len(starts) >= 2, starts  # the setup's PART (and passes), the END
    for at in starts:
        bad = bytearray(good)
        bad[HEADER_SIZE + at] = 0x00  # QEMU_VM_EOF where QEMU reads a section type
        damaged = tmp_path / "bad.sav"
        damaged.write_bytes(bad)
        error, out = restore_into(f"file:{damaged}", tmp_path / "out")
        assert isinstance(error, StreamError), (at, error)
        assert "checksum mismatch" in str(error), (at, error)
        assert len(out) <= at, f"EOF byte at {at}: {len(out)} bytes reached QEMU"
        assert out == s[: len(out)]


def reader_that_quits(fd: int, take: int) -> threading.Thread:
    """Reads ``take`` bytes from pipe ``fd``, then closes it (as a QEMU that refused
    the stream does)."""

    def run() -> None:
        got = 0
        while got < take:
            chunk = os.read(fd, take - got)
            if not chunk:
                break
            got += len(chunk)
        os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.fault(
    "the consumer (QEMU) stops reading mid-restore",
    direction="restore",
    vm="QEMU's load fails; it was never given the end of the stream",
    disk="image unchanged",
    exit="1",
    message="the real cause: checksum mismatch, or the image verified and the consumer "
    "refused it; never only a broken pipe",
)
@pytest.mark.parametrize("damaged", [False, True])
@pytest.mark.parametrize("name", [*REAL, BIG])
def test_the_consumer_quitting_early_gets_the_real_cause(
    tmp_path: Path, name: str, damaged: bool
) -> None:
    img, s = image_of(tmp_path, name)
    if damaged:  # a byte of a page's content, after what the consumer takes
        data = bytearray(img.read_bytes())
        data[HEADER_SIZE + len(s) // 2] ^= 0x10
        img.write_bytes(data)
    r, w = os.pipe()
    reader = reader_that_quits(r, 4096)
    try:
        with pytest.raises((StreamError, TransportError)) as info:
            vmtransport.restore_fd(f"file:{img}", w)
    finally:
        os.close(w)
        reader.join()
    message = str(info.value)
    if damaged:
        assert isinstance(info.value, StreamError)
        assert "checksum mismatch" in message
    else:
        assert isinstance(info.value, TransportError)
        assert "its checksum holds" in message
        assert "consumer" in message
    if name == BIG:  # it left mid-stream: the restore read and verified the rest
        assert "stopped reading after" in message, message
    # the CLI: one line, the same cause
    cli = subprocess.run(
        f"{VMT} restore file:{img} | head -c 4096 >/dev/null; exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 1
    line = one_error_line(cli.stderr)
    assert ("checksum mismatch" if damaged else "its checksum holds") in line, line


@pytest.mark.fault(
    "a flipped byte in the stream's setup (machine type, capabilities, RAM block list)",
    direction="restore",
    vm="QEMU is given none of the stream (REFUSED on a pipe): it fails at once",
    disk="image unchanged",
    exit="1",
    message="checksum mismatch in the stream's setup",
)
@pytest.mark.parametrize("name", REAL)
def test_the_setup_is_proven_before_qemu_sees_it(tmp_path: Path, name: str) -> None:
    """QEMU checks the setup against its own VM and refuses a damaged one at once (and
    kills an exec: helper 10 ms later): so the setup has its own checksum, proven
    before QEMU is given a byte, and the error says the image is corrupt."""
    img, s = image_of(tmp_path, name)
    meta = vmtransport.inspect_image(f"file:{img}")
    setup = meta["image"]["metadata"]["stream"]["setup"]
    length = setup["length"]
    # It ends where RAM's first iteration starts (a PART or END section of RAM).
    assert length == ram_section_starts(s)[0]
    machine = s.find(b"pc-")
    assert 0 < machine < length
    for at in (machine + 3, length // 2, length - 1):
        bad = bytearray(img.read_bytes())
        bad[HEADER_SIZE + at] ^= 0x01
        damaged = tmp_path / "bad.sav"
        damaged.write_bytes(bad)
        error, out = restore_into(f"file:{damaged}", tmp_path / "out")
        assert error is not None, at
        assert out == b"", f"flip at {at}: {len(out)} bytes reached QEMU"
        if "setup" not in str(error):  # a structural error the parser saw first
            assert isinstance(error, StreamError), error
        cli = subprocess.run(
            f"{VMT} restore file:{damaged} | cat",
            shell=True,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert cli.stdout == b"VMTRANSPORT-REFUSED\n", (at, cli.stdout[:40])
        assert str(damaged) in one_error_line(cli.stderr)


def early_device_stream() -> tuple[bytes, int]:
    """A stream with an early-setup device (virtio-mem's, a FULL section before RAM):
    the parser delimits it by a footer scan, not as QEMU does; where it starts."""
    w = StreamWriter().configuration("pc-q35-10.0")
    early = len(w.finish([], section_ids=[], description=False)) - 1  # before its EOF
    w = StreamWriter().configuration("pc-q35-10.0")
    w.device(Device("virtio-mem-early", b"\x7e\x00\x00\x00\x09junk" + bytes(50)), 9)
    w.section_start(2, "ram").block_list([("pc.ram", 1 << 20)]).eos().footer(2)
    w.section_part(2)
    for i in range(200):
        w.page((i % 256) * 4096, bytes([i]) * 4096, block="pc.ram" if i == 0 else None)
    w.eos().footer(2).section_part(2, end=True).eos().footer(2)
    return w.finish([Device("timer", bytes(24))], section_ids=[0]), early


@pytest.mark.parametrize("memory", [Holdback.MEMORY, 4096])
def test_an_opaque_section_holds_everything_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory: int
) -> None:
    """From an opaque section on, nothing reaches QEMU before the image is proven; the
    held part spools to a temporary file past Holdback.MEMORY and comes back whole."""
    s, early = early_device_stream()
    monkeypatch.setattr(Holdback, "MEMORY", memory)
    raw = tmp_path / "s.raw"
    raw.write_bytes(s)
    img = tmp_path / "s.sav"
    with raw.open("rb") as f:
        vmtransport.save_fd(f"file:{img}", f.fileno())
    error, out = restore_into(f"file:{img}", tmp_path / "out")
    assert error is None and out == s
    # damaged after the opaque section: QEMU got nothing from that section on
    bad = bytearray(img.read_bytes())
    bad[HEADER_SIZE + len(s) // 2] ^= 0x01
    img.write_bytes(bad)
    error, out = restore_into(f"file:{img}", tmp_path / "out")
    assert isinstance(error, StreamError) and "checksum mismatch" in str(error)
    assert len(out) <= early, (len(out), early)


class Capture(vmtransport.Sink):
    """What reaches QEMU: the bytes, and whether the restore committed."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.committed = False

    def write(self, data: memoryview) -> None:
        self.data += data

    def commit(self) -> None:
        self.committed = True

    def abort(self) -> None:
        pass


@pytest.mark.parametrize("chunk", [61, 4096, 1 << 20])
def test_the_setup_check_holds_however_the_bytes_come(tmp_path: Path, chunk: int) -> None:
    """The image fed to the restore's reader in pieces of any size (a pipe's short
    reads): the setup spans several of them and is still proven before QEMU gets a byte;
    an intact image comes through whole."""
    from vmtransport.image._reader import VerifyingReader

    img, s = image_of(tmp_path, REAL[0])
    good = img.read_bytes()
    bad = bytearray(good)
    bad[HEADER_SIZE + s.find(b"pc-") + 3] ^= 0x01  # in the machine type: the setup
    for data, damaged in ((good, False), (bytes(bad), True)):
        out = Capture()
        reader = VerifyingReader(out, "test:image")
        view = memoryview(data)
        try:
            for i in range(0, len(data), chunk):
                reader.write(view[i : i + chunk])
            reader.commit()
        except StreamError as exc:
            assert damaged and "checksum mismatch in the stream's setup" in str(exc), exc
            assert out.data == b"" and not out.committed
        else:
            assert not damaged and out.committed and out.data == s
