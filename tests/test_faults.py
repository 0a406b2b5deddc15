"""Faults of issue 11's list that no other module injects (docs/reliability.md): the
restore helper killed under a real QEMU, the medium vanishing under a save or a restore
(a loop device shrunk to nothing: every I/O then fails with EIO), the disk full at
several points of a save, a stream cut at every section boundary, an image flipped at
every section start and footer, two streams interleaved, and libvirt images damaged in
each header field, through the real ``vmtransport`` command."""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    MEM_MIB,
    VMT,
    Saved,
    description_at_end,
    listing,
    load,
    load_stream,
    one_error_line,
    restore_cmd,
    vmt,
)
from qemuvm import VM, VMError, describe_difference, files_equal, make_ram_file

import vmtransport
from vmtransport._usecases import REFUSED
from vmtransport.image._libvirt import build_libvirt_header
from vmtransport.testing import SyntheticStream

MIB = 1 << 20
HEADER = 65536
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (mounts, loop devices)")
NO_VM = "n/a (stream from a pipe, no VM)"

#: what a vanished medium looks like: EIO, or EROFS once ext4 remounted itself
#: read-only on the first I/O error (errors=remount-ro), whichever the write meets
VANISHED = re.compile(r"Input/output error|Read-only file system")


def pump_into(proc: subprocess.Popen[bytes], data: bytes) -> None:
    """Write ``data`` to the helper's stdin; it may have given up already."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
        proc.stdin.flush()
    except BrokenPipeError:
        pass


def open_in(pid: int, directory: Path) -> bool:
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(f"{directory}/"):
                return True
        except OSError:
            continue
    return False


def wait_until(cond: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --- the restore helper killed under a real QEMU -----------------------------------------


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(sig, id=sig.name, marks=pytest.mark.fault(
            f"helper {sig.name} mid-restore (real QEMU, half the image sent)",
            direction="restore",
            vm="destination QEMU's load fails (exit 1): never runs",
            disk="the image unchanged",
            exit="killed by SIGKILL" if sig == signal.SIGKILL else "1",
            message="none (killed)" if sig == signal.SIGKILL else "'interrupted by SIGTERM'",
        ))
        for sig in (signal.SIGTERM, signal.SIGKILL)
    ],
)  # fmt: skip
def test_helper_killed_mid_restore(saved: Saved, tmp_path: Path, sig: signal.Signals) -> None:
    """The helper reads the image from a FIFO the test feeds: half of it, then the
    signal; QEMU's load must fail and QEMU exit 1."""
    image = saved.image.read_bytes()
    fifo, pidfile, rcfile, err = (tmp_path / n for n in ("fifo", "pid", "rc", "err"))
    os.mkfifo(fifo)
    incoming = (
        f"exec:{VMT} restore file:{fifo} 2>{err} & echo $! > {pidfile}; wait $!; "
        f"echo $? > {rcfile}"
    )
    dst_ram = tmp_path / "dst.ram"
    make_ram_file(dst_ram, MEM_MIB, random=False)
    with VM(saved.qemu, tmp_path, name="dst", mem_mib=MEM_MIB, ram_file=dst_ram,
            incoming=incoming) as vm:  # fmt: skip
        deadline = time.monotonic() + 30
        while True:  # the helper opens the FIFO for reading once it runs
            try:
                w = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert time.monotonic() < deadline, "the helper never opened the FIFO"
                time.sleep(0.02)
        os.set_blocking(w, True)
        try:
            half = len(image) // 2
            assert os.write(w, image[:half]) == half  # returns once the helper took most
            wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), "the pid")
            os.kill(int(pidfile.read_text()), sig)
        finally:
            os.close(w)
        with pytest.raises(VMError):
            status = vm.wait_incoming(timeout=60)
            pytest.fail(f"the destination loaded half an image (status {status})")
        assert vm.returncode == 1
    wait_until(rcfile.exists, "the helper's exit status")
    rc = int(rcfile.read_text())
    if sig == signal.SIGKILL:
        assert rc == 128 + signal.SIGKILL
    else:
        assert rc == 1
        assert one_error_line(err.read_text()) == "vmtransport: error: interrupted by SIGTERM"
    assert saved.image.read_bytes() == image


# --- the medium vanishes ------------------------------------------------------------------


@dataclass
class Medium:
    """An ext4 filesystem on a loop device whose backing file can be taken away."""

    backing: Path
    device: str
    mnt: Path

    def vanish(self) -> None:
        os.truncate(self.backing, 0)
        subprocess.run(["losetup", "-c", self.device], check=True, timeout=30)


@pytest.fixture
def medium(tmp_path: Path) -> Iterator[Medium]:
    backing, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(backing, "wb") as f:
        f.truncate(320 * MIB)
    device = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                            capture_output=True, text=True, timeout=30).stdout.strip()  # fmt: skip
    try:
        subprocess.run(["mkfs.ext4", "-q", device], check=True, timeout=60)
        subprocess.run(["mount", "-o", "errors=continue", device, str(mnt)], check=True,
                       timeout=30)  # fmt: skip
        try:
            yield Medium(backing, device, mnt)
        finally:
            if subprocess.run(["umount", str(mnt)], check=False, timeout=30).returncode:
                subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)
    finally:
        subprocess.run(["losetup", "-d", device], check=False, timeout=30)


@pytest.fixture(scope="module")
def big() -> bytes:
    return SyntheticStream(size=48 * MIB + 777, seed=11).to_bytes()


@needs_root
@pytest.mark.parametrize("scheme", ["file", "odirect"])
@pytest.mark.fault(
    "medium vanishes mid-save (loop device shrunk to nothing: EIO)",
    direction="save",
    vm=NO_VM,
    disk="medium gone: not checked",
    exit="1",
    message="one line naming the URI: 'Input/output error' (or 'Read-only file system')",
)
def test_medium_vanishes_mid_save(medium: Medium, big: bytes, scheme: str) -> None:
    uri = f"{scheme}:{medium.mnt / 'vm.sav'}"
    proc = subprocess.Popen([str(VMT), "save", uri], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pump_into(proc, big[: 16 * MIB])
        wait_until(lambda: open_in(proc.pid, medium.mnt), "the temporary")
        time.sleep(0.2)
        medium.vanish()
        pump_into(proc, big[16 * MIB :])
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    line = one_error_line(err)
    assert uri in line and VANISHED.search(line), line


@needs_root
@pytest.mark.fault(
    "medium vanishes mid-save (real QEMU, odirect:, loop device shrunk to nothing)",
    direction="save",
    vm="source VM usable: migration failed, still prelaunch, saved again and restored "
    "byte-identical",
    disk="medium gone: not checked",
    exit="QEMU: migration failed",
    message="one line naming the image: 'Input/output error' (or 'Read-only file system')",
)
def test_medium_vanishes_mid_save_of_a_real_vm(qemu: str, medium: Medium, tmp_path: Path) -> None:
    src_ram = tmp_path / "src.ram"
    make_ram_file(src_ram, MEM_MIB, random=True)
    image, err = medium.mnt / "vm.sav", tmp_path / "save.err"
    with VM(qemu, tmp_path, name="src", mem_mib=MEM_MIB, ram_file=src_ram, paused=True) as vm:
        # 16 MiB/s: the 64 MiB save takes ~4 s. A 1 ms downtime limit keeps the failure in
        # the active phase (see test_qemu_save_restore.test_failed_save_keeps_source).
        vm.migrate(save_cmd(f"odirect:{image}", err), max_bandwidth=16 << 20,
                   parameters={"downtime-limit": 1})  # fmt: skip
        wait_until(lambda: vm.query_migrate().get("ram", {}).get("transferred", 0) > 16 * MIB,
                   "16 MiB on their way")  # fmt: skip
        medium.vanish()
        info = vm.wait_migration(timeout=120)
        assert info["status"] == "failed", info
        line = one_error_line(err.read_text())
        assert str(image) in line and VANISHED.search(line), line
        assert vm.status() == "prelaunch"
        vm.cmd("migrate-set-parameters", {"max-bandwidth": 100 << 30})
        good = tmp_path / "retry.sav"
        vm.migrate(save_cmd(f"file:{good}", tmp_path / "retry.err"))
        assert vm.wait_migration(timeout=120)["status"] == "completed", vm.log()
    dst = load(qemu, tmp_path, restore_cmd(f"file:{good}", tmp_path / "restore.err"))
    assert files_equal(src_ram, dst), describe_difference(src_ram, dst)


def save_cmd(uri: str, err: Path) -> str:
    """QEMU's exec: migration URI that saves into ``uri`` (stderr to ``err``)."""
    return f"exec:{VMT} save {uri} 2>{err}"


@needs_root
@pytest.mark.fault(
    "medium vanishes mid-restore (loop device shrunk to nothing: EIO)",
    direction="restore",
    vm="QEMU is given less than the stream up to its EOF marker",
    disk="medium gone: not checked",
    exit="1",
    message="one line naming the URI: 'Input/output error' (or 'Read-only file system')",
)
def test_medium_vanishes_mid_restore(medium: Medium) -> None:
    # More than the pump's pool (64 MiB) holds: the helper cannot have read it all.
    big = SyntheticStream(size=128 * MIB + 777, seed=12).to_bytes()
    image = medium.mnt / "vm.sav"
    uri = f"odirect:{image}"
    assert vmt("save", uri, input=big).returncode == 0
    eof, _ = description_at_end(big)
    proc = subprocess.Popen([str(VMT), "restore", uri], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        got = proc.stdout.read(4 * MIB)  # the helper is now blocked on the pipe
        time.sleep(0.2)
        medium.vanish()
        got += proc.stdout.read()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 1, err
    line = one_error_line(err)
    assert uri in line and VANISHED.search(line), line
    assert len(got) <= eof and got == big[: len(got)]


@pytest.mark.parametrize("scheme", ["file", "odirect"])
@pytest.mark.fault(
    "target directory removed mid-save",
    direction="save",
    vm=NO_VM,
    disk="nothing: the directory stays gone",
    exit="1",
    message="one line naming the URI: 'committing ...: No such file or directory'",
)
def test_target_directory_removed_mid_save(tmp_path: Path, big: bytes, scheme: str) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    uri = f"{scheme}:{sub / 'vm.sav'}"
    proc = subprocess.Popen([str(VMT), "save", uri], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pump_into(proc, big[: 16 * MIB])
        wait_until(lambda: open_in(proc.pid, sub), "the temporary")
        shutil.rmtree(sub)
        pump_into(proc, big[16 * MIB :])
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    line = one_error_line(err)
    assert uri in line and "No such file or directory" in line, line
    assert listing(tmp_path) == []


# --- the disk full at several points -------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], check=True,
                   timeout=30)  # fmt: skip
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def fill(mnt: Path, leave: int) -> None:
    """Leave ``leave`` bytes free on ``mnt`` (tmpfs counts whole pages)."""
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(mnt / ".filler", "wb") as f:
        f.write(b"\xaa" * (free - leave))
    assert os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize == leave


# Where the disk fills up: the bytes left free, given the image's size.
POINTS: dict[str, Callable[[int], int]] = {
    "before the header": lambda size: 0,
    "inside the header": lambda size: 32 << 10,
    "in the stream's last pages": lambda size: (size - 8192) & ~4095,
}


@needs_root
@pytest.mark.parametrize(
    "point",
    [
        pytest.param(point, marks=pytest.mark.fault(
            f"disk full {point} (tmpfs)", direction="save", vm=NO_VM,
            disk="nothing new on the mount", exit="1",
            message="one line naming the URI: 'No space left on device'",
        ))
        for point in POINTS
    ],
)  # fmt: skip
@pytest.mark.parametrize("scheme", ["file", "odirect"])
def test_disk_full_at_each_point(small_tmpfs: Path, scheme: str, point: str) -> None:
    stream = SyntheticStream(size=20 * MIB + 4321, seed=5).to_bytes()  # > one 8 MiB buffer
    fill(small_tmpfs, POINTS[point](HEADER + len(stream)))
    uri = f"{scheme}:{small_tmpfs / 'vm.sav'}"
    r = vmt("save", uri, input=stream)
    assert r.returncode == 1, r.stderr
    line = one_error_line(r.stderr)
    assert uri in line and "No space left on device" in line, line
    assert listing(small_tmpfs) == [".filler"]


# --- cuts at every section boundary, flips at every section start and footer ----------------


SYNTHETIC = SyntheticStream(60, seed=2, zero_fraction=0.25, switchover_start=True)
STREAM = bytes(SYNTHETIC)
LAYOUT = SYNTHETIC.layout
BOUNDARIES = sorted({s.offset for s in LAYOUT.sections} | {s.footer + 5 for s in LAYOUT.sections}
                    | {LAYOUT.eof, LAYOUT.eof + 1})  # fmt: skip


@pytest.mark.fault(
    "stream truncated at every section boundary (save)",
    direction="save",
    vm=NO_VM,
    disk="nothing in the target directory",
    exit="VMTransportError raised (the CLI's exit 1)",
    message="names the URI: 'incomplete migration stream'",
)
def test_save_of_a_stream_cut_at_every_section_boundary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    src = tmp_path / "cut"
    assert len(BOUNDARIES) >= 8
    for cut in BOUNDARIES:
        src.write_bytes(STREAM[:cut])
        uri = f"file:{out / 'vm.sav'}"
        with open(src, "rb") as f, pytest.raises(vmtransport.VMTransportError) as info:
            vmtransport.save_fd(uri, f.fileno())
        assert uri in str(info.value) and "incomplete migration stream" in str(info.value)
        assert listing(out) == [], cut


@pytest.fixture(scope="module")
def synthetic_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("faults") / "img"
    r = vmt("save", f"file:{path}", input=STREAM)
    assert r.returncode == 0, r.stderr
    return path.read_bytes()


def restored(tmp_path: Path, image: bytes) -> tuple[str, bytes]:
    """Restore ``image`` (written to a file) to a file: (error message, bytes out)."""
    src, out = tmp_path / "img", tmp_path / "out"
    src.write_bytes(image)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with pytest.raises(vmtransport.VMTransportError) as info:
            vmtransport.restore_fd(f"file:{src}", fd)
    finally:
        os.close(fd)
    return str(info.value), out.read_bytes()


@pytest.mark.fault(
    "image truncated at every section boundary",
    direction="restore",
    vm="QEMU is given less than the stream up to its EOF marker",
    disk="n/a",
    exit="VMTransportError raised (the CLI's exit 1)",
    message="names the image: 'truncated'",
)
def test_restore_of_an_image_cut_at_every_section_boundary(
    tmp_path: Path, synthetic_image: bytes
) -> None:
    for cut in BOUNDARIES:
        message, out = restored(tmp_path, synthetic_image[: HEADER + cut])
        assert "truncated" in message, (cut, message)
        assert len(out) <= LAYOUT.eof and out == STREAM[: len(out)], cut


@pytest.mark.fault(
    "byte flipped at every section start and footer of an image (structural)",
    direction="restore",
    vm="QEMU is given less than the stream up to its EOF marker",
    disk="n/a",
    exit="VMTransportError raised (the CLI's exit 1)",
    message="one line naming the image",
)
def test_restore_of_an_image_flipped_at_every_section_start_and_footer(
    tmp_path: Path, synthetic_image: bytes
) -> None:
    spots = [s.offset for s in LAYOUT.sections] + [s.footer for s in LAYOUT.sections]
    spots += [LAYOUT.eof, *LAYOUT.commands]
    for at in sorted(spots):
        for mask in (0x01, 0x80):
            image = bytearray(synthetic_image)
            image[HEADER + at] ^= mask
            message, out = restored(tmp_path, bytes(image))
            assert str(tmp_path / "img") in message and "\n" not in message, (at, message)
            assert len(out) <= LAYOUT.eof, (at, mask, len(out))


# --- two streams interleaved --------------------------------------------------------------


def interleave(a: bytes, b: bytes, chunk: int) -> bytes:
    out = bytearray()
    for i in range(0, max(len(a), len(b)), chunk):
        out += a[i : i + chunk] + b[i : i + chunk]
    return bytes(out)


@pytest.mark.parametrize("chunk", [4096, 65536, 1 << 20])
@pytest.mark.parametrize("pair", ["same-stream", "7.2-and-10.0"])
@pytest.mark.fault(
    "two streams interleaved (chunks of 4 KiB to 1 MiB)",
    direction="save",
    vm=NO_VM,
    disk="nothing in the target directory",
    exit="1",
    message="one line naming the URI",
)
def test_save_refuses_two_interleaved_streams(tmp_path: Path, pair: str, chunk: int) -> None:
    a = load_stream("qemu7.2-pc")[0]
    b = a if pair == "same-stream" else load_stream("qemu10.0-q35")[0]
    out = tmp_path / "out"
    out.mkdir()
    uri = f"file:{out / 'vm.sav'}"
    r = vmt("save", uri, input=interleave(a, b, chunk))
    assert r.returncode == 1, r.stderr
    assert uri in one_error_line(r.stderr)
    assert listing(out) == []


# --- libvirt images damaged in each header field --------------------------------------------


def libvirt(stream: bytes) -> bytearray:
    return bytearray(build_libvirt_header("<domain><name>g</name></domain>", was_running=True)
                     + stream)  # fmt: skip


LIBVIRT = {  # field: (offset, new value as a native-order be32 or bytes, outcome)
    "magic": (0, b"LibvirtQemudSavX", "refused"),
    "version": (16, 7, "refused"),
    "XML length (data_len)": (20, 0, "refused"),
    "was_running": (24, 0xDEAD, "passed"),
    "format (compressed)": (28, 9, "refused"),
    "cookieOffset": (32, 1 << 20, "refused"),
    "unused bytes": (40, 0xFFFFFFFF, "passed"),
}


@pytest.mark.parametrize(
    "field",
    [
        pytest.param(field, marks=pytest.mark.fault(
            f"libvirt image: {field} damaged", direction="restore",
            vm=("QEMU gets the refusal marker, not a stream" if outcome == "refused"
                else "QEMU is given the stream unchanged (the field is not used)"),
            disk="n/a", exit="1" if outcome == "refused" else "0",
            message="one line naming the image" if outcome == "refused" else "none",
        ))
        for field, (_, _, outcome) in LIBVIRT.items()
    ],
)  # fmt: skip
def test_libvirt_image_damaged_in_each_field(tmp_path: Path, field: str) -> None:
    stream = load_stream("qemu7.2-pc")[0]
    image = libvirt(stream)
    at, value, outcome = LIBVIRT[field]
    if isinstance(value, bytes):
        image[at : at + len(value)] = value
    else:
        struct.pack_into("=I", image, at, value)
    path = tmp_path / "lv.sav"
    path.write_bytes(image)
    r = vmt("restore", f"file:{path}")
    if outcome == "refused":
        assert r.returncode == 1
        assert str(path) in one_error_line(r.stderr)
        assert r.stdout == REFUSED  # not the stream: a QEMU reading this fails its load
    else:
        assert r.returncode == 0, r.stderr
        assert r.stdout == stream
