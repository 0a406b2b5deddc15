"""Save and restore real VMs through vmtransport, on QEMU 7.2 and 10.0.

The source runs with its RAM in a shared file of random bytes; it is saved with
``migrate "exec:vmtransport save URI"`` and restored into a second QEMU started with
``-incoming "exec:vmtransport restore URI"`` over a zeroed RAM file; the two RAM files
must then be equal byte for byte. The source is started with -S so its RAM cannot
change under a running guest.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemuvm import VM, describe_difference, files_equal, make_ram_file

MEM_MIB = 256


@pytest.fixture
def src_ram(tmp_path: Path) -> Path:
    path = tmp_path / "src.ram"
    make_ram_file(path, MEM_MIB, random=True)
    return path


def save_command(vmt: Path, uri: str) -> str:
    return f"{vmt} save {shlex.quote(uri)}"


def restore_command(vmt: Path, uri: str) -> str:
    return f"{vmt} restore {shlex.quote(uri)}"


def save(qemu: str, tmp: Path, ram: Path, migrate_uri: str, name: str = "src") -> dict[str, object]:
    with VM(qemu, tmp, name=name, mem_mib=MEM_MIB, ram_file=ram, paused=True) as vm:
        vm.migrate(migrate_uri)
        info = vm.wait_migration(timeout=120)
        assert info["status"] == "completed", (info, vm.log())
        assert vm.status() == "postmigrate"
        return info


def restore_and_compare(qemu: str, tmp: Path, src_ram: Path, incoming: str) -> None:
    dst_ram = tmp / "dst.ram"
    dst_ram.unlink(missing_ok=True)
    make_ram_file(dst_ram, MEM_MIB, random=False)
    with VM(qemu, tmp, name="dst", mem_mib=MEM_MIB, ram_file=dst_ram, incoming=incoming) as vm:
        status = vm.wait_incoming(timeout=120)
        assert status == "prelaunch", vm.log()
    assert files_equal(src_ram, dst_ram), describe_difference(src_ram, dst_ram)


def transport_uris(kind: str, image: Path) -> tuple[str, str]:
    """(save command's URI, restore command's URI) -> vmtransport arguments."""
    if kind == "exec":
        return f"exec:cat > {image}", f"exec:cat {image}"
    return f"{kind}:{image}", f"{kind}:{image}"


@pytest.mark.parametrize("kind", ["file", "odirect", "exec"])
def test_save_restore_roundtrip(
    qemu: str, tmp_path: Path, src_ram: Path, vmtransport_cmd: Path, kind: str
) -> None:
    image = tmp_path / "vm.sav"
    save_uri, restore_uri = transport_uris(kind, image)
    save(qemu, tmp_path, src_ram, "exec:" + save_command(vmtransport_cmd, save_uri))
    if kind != "exec":  # exec: files are the command's (cat's umask)
        assert image.stat().st_mode & 0o777 == 0o600
    assert image.stat().st_size > MEM_MIB << 20
    assert not list(tmp_path.glob(".vm.sav*")), "temporary left behind"
    restore_and_compare(
        qemu, tmp_path, src_ram, "exec:" + restore_command(vmtransport_cmd, restore_uri)
    )


def test_save_restore_inherited_fd(
    qemu: str, tmp_path: Path, src_ram: Path, vmtransport_cmd: Path
) -> None:
    """``fd:3`` on both sides: the shell QEMU runs opens the image on fd 3."""
    image = tmp_path / "vm.sav"
    save(qemu, tmp_path, src_ram, f"exec:{vmtransport_cmd} save fd:3 3>{image}")
    restore_and_compare(qemu, tmp_path, src_ram, f"exec:{vmtransport_cmd} restore fd:3 3<{image}")


def test_save_restore_named_fd(
    qemu: str, tmp_path: Path, src_ram: Path, vmtransport_cmd: Path
) -> None:
    """``fd:NAME`` passed the systemd way (LISTEN_FDS/LISTEN_FDNAMES, fds from 3)."""
    image = tmp_path / "vm.sav"
    env = "LISTEN_FDS=1 LISTEN_FDNAMES=image"
    save(qemu, tmp_path, src_ram, f"exec:{env} exec {vmtransport_cmd} save fd:image 3>{image}")
    restore_and_compare(
        qemu, tmp_path, src_ram, f"exec:{env} exec {vmtransport_cmd} restore fd:image 3<{image}"
    )


def test_qemu_fd_migration_through_vmtransport(
    qemu: str, tmp_path: Path, src_ram: Path, vmtransport_cmd: Path
) -> None:
    """The management-tool arrangement: QEMU's own ``fd:NAME`` (getfd over QMP with
    SCM_RIGHTS) feeding a vmtransport helper the tool started, both directions."""
    image = tmp_path / "vm.sav"
    r, w = os.pipe()
    helper = subprocess.Popen([vmtransport_cmd, "save", f"odirect:{image}"], stdin=r)
    os.close(r)
    try:
        with VM(qemu, tmp_path, name="src", mem_mib=MEM_MIB, ram_file=src_ram, paused=True) as vm:
            vm.qmp.send_fd(w, "migfd")
            os.close(w)
            w = -1
            vm.migrate("fd:migfd")
            info = vm.wait_migration(timeout=120)
            assert info["status"] == "completed", vm.log()
        assert helper.wait(timeout=60) == 0
    finally:
        if w >= 0:
            os.close(w)
        if helper.poll() is None:
            helper.kill()
            helper.wait()

    dst_ram = tmp_path / "dst.ram"
    make_ram_file(dst_ram, MEM_MIB, random=False)
    r, w = os.pipe()
    helper = subprocess.Popen([vmtransport_cmd, "restore", f"odirect:{image}"], stdout=w)
    os.close(w)
    try:
        with VM(qemu, tmp_path, name="dst", mem_mib=MEM_MIB, ram_file=dst_ram,
                incoming="defer") as vm:  # fmt: skip
            vm.qmp.send_fd(r, "inmig")
            os.close(r)
            r = -1
            vm.cmd("migrate-incoming", {"uri": "fd:inmig"})
            assert vm.wait_incoming(timeout=120) == "prelaunch", vm.log()
        assert helper.wait(timeout=60) == 0
    finally:
        if r >= 0:
            os.close(r)
        if helper.poll() is None:
            helper.kill()
            helper.wait()
    assert files_equal(src_ram, dst_ram), describe_difference(src_ram, dst_ram)


# --- failure paths: the migration fails on QEMU's side, the source VM stays usable, and
# --- nothing appears under the final name.


def assert_source_usable(vm: VM, tmp: Path, src_ram: Path, vmt: Path, qemu: str) -> None:
    """Still there: answers QMP, is not left paused-for-migration, and can be saved
    again successfully (and that image restores to the same RAM)."""
    assert vm.returncode is None
    assert vm.status() == "prelaunch"
    good = tmp / "retry.sav"
    vm.migrate("exec:" + save_command(vmt, f"odirect:{good}"))
    assert vm.wait_migration(timeout=120)["status"] == "completed", vm.log()
    vm.close()
    restore_and_compare(qemu, tmp, src_ram, "exec:" + restore_command(vmt, f"odirect:{good}"))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs: too small for the 256 MiB guest."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(mnt)],
                   check=True)  # fmt: skip
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _failed(fault: str, message: str) -> pytest.MarkDecorator:
    return pytest.mark.fault(
        fault,
        direction="save",
        vm="source VM usable: migration failed, still prelaunch, saved again and restored "
        "byte-identical",
        disk="no file under the final name; no temporary left",
        exit="QEMU: migration failed (the helper's status is QEMU's to see)",
        message=message,
    )


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param("missing-directory", marks=_failed(
            "target directory missing (real QEMU)", "one line naming the image: 'does not exist'"
        )),
        pytest.param("disk-full", marks=_failed(
            "disk full mid-save (real QEMU, 64 MiB tmpfs, 256 MiB VM)",
            "one line naming the image: 'No space left'",
        )),
    ],
)  # fmt: skip
@pytest.mark.parametrize("kind", ["odirect", "file"])
def test_failed_save_keeps_source(
    qemu: str,
    tmp_path: Path,
    src_ram: Path,
    vmtransport_cmd: Path,
    request: pytest.FixtureRequest,
    failure: str,
    kind: str,
) -> None:
    if failure == "disk-full":
        target_dir: Path = request.getfixturevalue("small_fs")
    else:
        target_dir = tmp_path / "no" / "such" / "dir"
    image = target_dir / "vm.sav"
    log = tmp_path / "helper.err"
    with VM(qemu, tmp_path, name="src", mem_mib=MEM_MIB, ram_file=src_ram, paused=True) as vm:
        # A 1 ms downtime limit keeps QEMU from sending all of a paused guest's RAM in
        # its completion phase, where a failure leaves the source "postmigrate" (QEMU's
        # rule, whatever the helper does): the failure lands in the active phase.
        vm.migrate(
            f"exec:{save_command(vmtransport_cmd, f'{kind}:{image}')} 2>{log}",
            parameters={"downtime-limit": 1},
        )
        info = vm.wait_migration(timeout=120)
        assert info["status"] == "failed", info
        assert not image.exists()
        if target_dir.exists():
            assert list(target_dir.iterdir()) == [], "temporary left behind"
        err = log.read_text()
        reason = "does not exist" if failure == "missing-directory" else "No space left"
        assert "vmtransport: error: " in err and reason in err and str(image) in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert_source_usable(vm, tmp_path, src_ram, vmtransport_cmd, qemu)


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(sig, id=sig.name, marks=pytest.mark.fault(
            f"helper {sig.name} mid-save (real QEMU, odirect:)", direction="save",
            vm="source VM usable: migration failed, saved again and restored byte-identical",
            disk="no file under the final name; no temporary left",
            exit="QEMU: migration failed", message="not checked",
        ))
        for sig in (signal.SIGTERM, signal.SIGKILL)
    ],
)  # fmt: skip
def test_helper_killed_mid_save(
    qemu: str, tmp_path: Path, src_ram: Path, vmtransport_cmd: Path, sig: signal.Signals
) -> None:
    image = tmp_path / "vm.sav"
    pidfile = tmp_path / "helper.pid"
    cmd = f"exec:echo $$ > {pidfile}; exec {save_command(vmtransport_cmd, f'odirect:{image}')}"
    with VM(qemu, tmp_path, name="src", mem_mib=MEM_MIB, ram_file=src_ram, paused=True) as vm:
        # 32 MiB/s: the 256 MiB save takes ~8 s, time to kill the helper in the middle.
        vm.migrate(cmd, max_bandwidth=32 << 20)
        deadline = time.monotonic() + 30
        while True:
            info = vm.query_migrate()
            if info.get("ram", {}).get("transferred", 0) > 32 << 20:
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.05)
        os.kill(int(pidfile.read_text()), sig)
        info = vm.wait_migration(timeout=120)
        assert info["status"] == "failed", info
        assert not image.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".vm.sav")] == []
        vm.cmd("migrate-set-parameters", {"max-bandwidth": 100 << 30})
        assert_source_usable(vm, tmp_path, src_ram, vmtransport_cmd, qemu)
