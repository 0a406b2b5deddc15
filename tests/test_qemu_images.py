"""Images of real VMs, QEMU 7.2 and 10.0: saves know when the stream is complete, the
header says what docs/image-format.md says, and restores verify before they commit.

Each QEMU version's source VM (64 MiB of random RAM, started with -S) is saved once per
session (the ``saved`` fixture, shared with test_inspect.py and test_libvirt_restore.py),
in one migration to three targets: ``tee`` copies QEMU's bytes to a plain file (what
``exec:cat > FILE`` writes), to a ``file:...,format=raw`` save and to an ``odirect:``
image save named ``web1``. Restores go into real destination QEMUs
(``-incoming "exec:vmtransport restore ..."``) whose RAM file is compared with the
source's; a damaged image must make the destination's load fail (QEMU exits with
status 1) with the helper's one-line reason on its stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    HEADER_SIZE,
    MEM_MIB,
    VMT,
    Saved,
    check_complete_image,
    damage,
    failed_load,
    listing,
    load,
    one_error_line,
    parse_header,
    restore_cmd,
    wait_for,
)
from qemuvm import VM, describe_difference, files_equal, make_ram_file

from vmtransport.testing import cached_bytes

# --- destinations ---------------------------------------------------------------------


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --- point 1: a save knows when the stream is complete ------------------------------------


def test_one_migration_to_image_raw_and_cat(saved: Saved, tmp_path: Path) -> None:
    """``,format=raw`` writes QEMU's bytes exactly (those ``exec:cat > FILE`` got from the
    same migration); the image holds the same bytes and ``restore`` gives them back."""
    stream = saved.cat.read_bytes()
    assert stream[:8] == b"QEVM\0\0\0\3"
    assert saved.raw.read_bytes() == stream
    for path in (saved.raw, saved.image):
        assert path.stat().st_mode & 0o777 == 0o600
    assert [n for n in listing(saved.dir) if "tmp" in n] == [], "temporary left"
    out = tmp_path / "restored"
    with open(out, "wb") as f:
        r = subprocess.run([VMT, "restore", f"file:{saved.image}"], stdout=f,
                           stderr=subprocess.PIPE, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0 and r.stderr == b""
    assert files_equal(out, saved.raw), describe_difference(out, saved.raw)


def wait_transferred(vm: VM, nbytes: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = vm.query_migrate()
        if info.get("ram", {}).get("transferred", 0) > nbytes:
            assert info["status"] == "active", info
            return
        assert info.get("status") not in ("completed", "failed", "cancelled"), info
        assert time.monotonic() < deadline, info
        time.sleep(0.02)


def _interrupted(fault: str, vm: str) -> pytest.MarkDecorator:
    return pytest.mark.fault(
        fault,
        direction="save",
        vm=vm,
        disk="target directory empty: no image, no temporary",
        exit="1",
        message="one line naming the image: 'incomplete migration stream'",
    )


@pytest.mark.parametrize(
    ("how", "kind"),
    [
        pytest.param("migrate_cancel", "odirect", marks=_interrupted(
            "migration cancelled mid-save (migrate_cancel)", "source reports 'cancelled'"
        )),
        pytest.param("SIGKILL", "file", marks=_interrupted(
            "QEMU killed mid-save (SIGKILL)", "n/a (the source QEMU is killed)"
        )),
    ],
)  # fmt: skip
def test_interrupted_save_leaves_no_image(qemu: str, tmp_path: Path, how: str, kind: str) -> None:
    """The helper is fed through QEMU's own ``fd:`` (getfd), so the test holds its exit
    status. QEMU closes the pipe early (cancel) or dies: the helper exits 1 saying the
    stream is incomplete, and the target directory is left empty."""
    src_ram = tmp_path / "src.ram"
    make_ram_file(src_ram, MEM_MIB, random=True)
    out = tmp_path / "out"
    out.mkdir()
    image = out / "vm.sav"
    r, w = os.pipe()
    helper = subprocess.Popen([VMT, "save", f"{kind}:{image}"], stdin=r, stderr=subprocess.PIPE)
    os.close(r)
    try:
        with VM(qemu, tmp_path, name="src", mem_mib=MEM_MIB, ram_file=src_ram, paused=True) as vm:
            vm.qmp.send_fd(w, "migfd")
            os.close(w)
            w = -1
            vm.migrate("fd:migfd", max_bandwidth=32 << 20)  # 64 MiB: ~2 s
            wait_transferred(vm, 16 << 20)
            assert helper.poll() is None
            assert not image.exists(), "an image under the final name mid-save"
            # The helper writes an unnamed O_TMPFILE (or a dot-named temporary) in out/.
            assert all(n.startswith(".vm.sav") for n in listing(out)), listing(out)
            fds = Path(f"/proc/{helper.pid}/fd")
            assert any(os.readlink(fd).startswith(f"{out}/") for fd in fds.iterdir())
            if how == "migrate_cancel":
                vm.cmd("migrate_cancel")
                assert vm.wait_migration(timeout=60)["status"] == "cancelled"
            else:
                vm.kill()
            rc = helper.wait(timeout=30)
    finally:
        if w >= 0:
            os.close(w)
        if helper.poll() is None:
            helper.kill()
            helper.wait()
    assert helper.stderr is not None
    line = one_error_line(helper.stderr.read())
    helper.stderr.close()
    assert rc == 1
    assert "incomplete migration stream" in line and str(image) in line, line
    assert listing(out) == [], "image or temporary left"


# --- point 2: the header -------------------------------------------------------------------


def test_image_header_of_a_real_vm(saved: Saved) -> None:
    stream = saved.cat.read_bytes()
    h = check_complete_image(saved.image, stream)
    assert h.metadata["name"] == "web1"
    s = h.metadata["stream"]
    assert saved.machine == f"pc-i440fx-{saved.version}"
    assert s["machine_type"] == saved.machine
    assert {b["name"]: b["used_length"] for b in s["ram_blocks"]} == saved.ramblocks
    assert s["ram_blocks"][0] == {"name": saved.main_block, "used_length": MEM_MIB << 20}
    assert saved.memdev_size == MEM_MIB << 20
    assert s["ram_total_bytes"] == sum(saved.ramblocks.values())
    assert s["runstate"] == "prelaunch"
    assert s["vm_description"] is True


def test_odirect_keeps_the_image_out_of_the_page_cache(saved: Saved, tmp_path: Path) -> None:
    cached, size = saved.cached_after_save
    assert size == saved.image.stat().st_size
    assert cached <= size // 100, f"{cached} of {size} bytes cached after an odirect: save"
    drop_cache(saved.image)  # other tests read it buffered
    assert cached_bytes(saved.image)[0] <= size // 100
    err = tmp_path / "restore.err"
    dst = load(saved.qemu, tmp_path, restore_cmd(f"odirect:{saved.image}", err))
    assert err.read_text() == ""
    assert files_equal(saved.src_ram, dst), describe_difference(saved.src_ram, dst)
    cached, _ = cached_bytes(saved.image)
    assert cached <= size // 100, f"{cached} of {size} bytes cached after an odirect: restore"


def test_offset_image_from_qemu(qemu: str, tmp_path: Path) -> None:
    """QEMU saves through ``odirect:PATH,offset=8192``: the prefix stays, the image
    starts there, and a destination restores from there."""
    src_ram = tmp_path / "src.ram"
    make_ram_file(src_ram, MEM_MIB, random=True)
    path = tmp_path / "disk.bin"
    prefix = os.urandom(8192)
    path.write_bytes(prefix)
    uri = f"odirect:{path},offset=8192"
    err = tmp_path / "save.err"
    with VM(qemu, tmp_path, name="src", mem_mib=MEM_MIB, ram_file=src_ram, paused=True) as vm:
        vm.migrate(f"exec:{VMT} save {uri} 2>{err}")
        assert vm.wait_migration(timeout=120)["status"] == "completed", vm.log()
    wait_for([err])
    data = path.read_bytes()
    assert err.read_text() == ""
    assert data[:8192] == prefix
    h = parse_header(data[8192:])
    assert h.magic == b"VMTIMAGE" and h.state == 1 and h.crc_ok
    assert h.payload_length == len(data) - 8192 - HEADER_SIZE
    dst = load(qemu, tmp_path, restore_cmd(uri, tmp_path / "restore.err"))
    assert files_equal(src_ram, dst), describe_difference(src_ram, dst)


# --- point 3: restores verify before they commit -------------------------------------------


EXPECTED = {
    "payload-flip": "checksum mismatch",
    "truncated-mid": "truncated",
    "truncated-tail": "truncated",
    "partial": "partial",
    "header-flip": "corrupt (CRC mismatch)",
}


def test_intact_image_restores(saved: Saved, tmp_path: Path) -> None:
    err = tmp_path / "restore.err"
    dst = load(saved.qemu, tmp_path, restore_cmd(f"file:{saved.image}", err))
    assert err.read_text() == ""
    assert files_equal(saved.src_ram, dst), describe_difference(saved.src_ram, dst)


DAMAGE = {
    "payload-flip": "image: a byte of the guest's RAM flipped mid-payload",
    "truncated-mid": "image truncated mid-payload",
    "truncated-tail": "image truncated inside the VM description (after QEMU's EOF marker)",
    "partial": "image marked partial (header state 0, CRC right)",
    "header-flip": "image: a header byte flipped (metadata padding: the CRC only)",
}


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(how, marks=pytest.mark.fault(
            DAMAGE[how], direction="restore",
            vm="destination QEMU's load fails (exit 1): never runs", disk="n/a",
            exit="QEMU exits 1; inspect " + (
                "exits 1" if how == "header-flip" else "--json exits 0: complete false"
            ),
            message=f"one line naming the image: '{expected}'",
        ))
        for how, expected in EXPECTED.items()
    ],
)  # fmt: skip
def test_damaged_image_fails_the_load(saved: Saved, tmp_path: Path, how: str) -> None:
    bad = tmp_path / "bad.img"
    damage(saved, how, bad)
    err = tmp_path / "restore.err"
    # Refused at the header (partial, header-flip), the helper hands QEMU a marker that is
    # not a stream rather than nothing (QEMU would wait for ever): every case fails.
    failed_load(saved.qemu, tmp_path, restore_cmd(f"file:{bad}", err))
    line = one_error_line(err.read_text())
    assert EXPECTED[how] in line and str(bad) in line, line
    # inspect describes it rather than failing; verify refuses it with the same reason.
    r = subprocess.run([VMT, "inspect", "--json", str(bad)], capture_output=True, timeout=60,
                       check=False)  # fmt: skip
    if how == "header-flip":
        assert r.returncode == 1 and EXPECTED[how] in one_error_line(r.stderr)
    else:
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["complete"] is False
        assert any(EXPECTED[how] in p for p in doc["problems"]), doc["problems"]
