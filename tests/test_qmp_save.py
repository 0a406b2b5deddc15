"""``vmtransport save --qmp SOCKET URI`` and ``vmtransport.save_vm``, against real QEMU
7.2 and 10.0: the image restores through ``exec:`` into a destination whose RAM is
byte-identical to the source's; the source's run state, migration capabilities and
parameters end as promised; a failed save leaves the VM as it was and no image.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import MEM_MIB, VMT, parse_header, restore_cmd
from qemuvm import VM, describe_difference, files_equal, make_ram_file

import vmtransport
from vmtransport import qmp

pytestmark = pytest.mark.qemu
TIMEOUT = 120


def halt_bios(tmp: Path) -> list[str]:
    """``-bios`` of 64 KiB of HLT: a running guest that writes no RAM. SeaBIOS would
    write its own, and QEMU's load then rewrites a byte of it on the destination even
    through plain ``exec:cat`` (seen on 7.2 and 10.0), so RAM could not be compared."""
    path = tmp / "hlt.bin"
    if not path.exists():
        path.write_bytes(b"\xf4" * 65536)
    return ["-bios", str(path)]


#: RAM of the VMs whose save must fail mid-stream: more than the pump's buffers (64 MiB)
#: and its pipe hold, or QEMU could finish sending before the failure shows.
BIG_MIB = 256


@contextmanager
def source_vm(
    qemu: str, tmp: Path, *, paused: bool, mem_mib: int = MEM_MIB
) -> Iterator[tuple[VM, str]]:
    """A VM with random RAM (64 MiB), named web1, with a second QMP socket for
    vmtransport (the harness holds the first: QEMU serves one client per socket)."""
    ram = tmp / "src.ram"
    make_ram_file(ram, mem_mib, random=True)
    sock = f"/tmp/vmt-save-{os.getpid()}-{time.monotonic_ns()}.sock"
    args = ["-qmp", f"unix:{sock},server=on,wait=off", "-name", "web1", *halt_bios(tmp)]
    try:
        with VM(
            qemu, tmp, name="src", mem_mib=mem_mib, ram_file=ram, paused=paused, extra_args=args
        ) as vm:
            yield vm, sock
    finally:
        Path(sock).unlink(missing_ok=True)


def migration_settings(vm: VM) -> tuple[dict[str, bool], int, int]:
    caps = {c["capability"]: c["state"] for c in vm.cmd("query-migrate-capabilities")}
    params = vm.cmd("query-migrate-parameters")
    return caps, params["max-bandwidth"], params["downtime-limit"]


def customise(vm: VM) -> tuple[dict[str, bool], int, int]:
    """Settings a save must change and put back: xbzrle on, a slow bandwidth, another
    downtime limit."""
    vm.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True}]})
    vm.cmd("migrate-set-parameters", {"max-bandwidth": 12345678, "downtime-limit": 250})
    settings = migration_settings(vm)
    assert settings[0]["xbzrle"] and settings[1:] == (12345678, 250)
    return settings


def wait_active(vm: VM, proc: subprocess.Popen[str]) -> None:
    """Wait until the save's migration runs; fail with its stderr if it ended first."""
    deadline = time.monotonic() + 30
    while vm.query_migrate().get("status") != "active":
        if proc.poll() is not None or time.monotonic() > deadline:
            assert proc.stderr is not None
            pytest.fail(
                f"the save did not get going: {proc.stderr.read()!r} ({vm.query_migrate()})"
            )
        time.sleep(0.02)


def save_cli(sock: str, uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VMT), "save", "--qmp", sock, uri, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def restore_into(qemu: str, tmp: Path, image: Path) -> tuple[Path, str]:
    """Load ``image`` through the exec: path; returns the RAM file and the run state."""
    ram = tmp / "dst.ram"
    make_ram_file(ram, MEM_MIB, random=False)
    err = tmp / "restore.err"
    incoming = restore_cmd(f"file:{image}", err)
    with VM(
        qemu,
        tmp,
        name="dst",
        mem_mib=MEM_MIB,
        ram_file=ram,
        incoming=incoming,
        extra_args=halt_bios(tmp),
    ) as vm:
        status = vm.wait_incoming(timeout=60)
    assert err.read_text() == ""
    return ram, status


def image_metadata(image: Path) -> dict[str, Any]:
    with open(image, "rb") as f:
        header = parse_header(f.read(65536))
    meta: dict[str, Any] = header.metadata
    return meta


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_save_then_exec_restore(qemu: str, tmp_path: Path, paused: bool) -> None:
    image = tmp_path / "web1.img"
    with source_vm(qemu, tmp_path, paused=paused) as (vm, sock):
        before = customise(vm)
        version = vm.cmd("query-version")["qemu"]
        result = save_cli(sock, f"file:{image}")
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
        # --after pause (the default): the VM does not run on beside its image.
        assert vm.status() == "postmigrate"
        assert migration_settings(vm) == before
        assert vm.query_migrate()["status"] == "completed"
        src_ram = vm.ram_file
        meta = image_metadata(image)
        assert meta["name"] == "web1"
        assert meta["vm"] == {
            "name": "web1",
            "qemu_version": f"{version['major']}.{version['minor']}.{version['micro']}",
            "qemu_package": meta["vm"]["qemu_package"],
            "machine_type": meta["stream"]["machine_type"],
            "runstate": "prelaunch" if paused else "running",
            "ram_size": MEM_MIB << 20,
        }
        assert meta["vm"]["machine_type"].startswith("pc-i440fx-")
        # What the destination does after loading: a VM we stopped comes back paused.
        assert meta["stream"]["runstate"] == ("prelaunch" if paused else "paused")
        dst_ram, status = restore_into(qemu, tmp_path, image)
        assert status == meta["stream"]["runstate"]
        assert files_equal(src_ram, dst_ram), describe_difference(src_ram, dst_ram)
    assert oct(image.stat().st_mode & 0o777) == oct(0o600)


def test_after_resume_and_quit(qemu: str, tmp_path: Path) -> None:
    with source_vm(qemu, tmp_path, paused=False) as (vm, sock):
        result = save_cli(sock, f"file:{tmp_path / 'a.img'}", "--after", "resume")
        assert (result.returncode, result.stderr) == (0, "")
        assert vm.status() == "running"
        result = save_cli(sock, f"file:{tmp_path / 'b.img'}", "--after", "quit")
        assert (result.returncode, result.stderr) == (0, "")
        assert vm.wait_exit(timeout=30) == 0
    for name in ("a.img", "b.img"):
        assert image_metadata(tmp_path / name)["vm"]["runstate"] == "running"


def test_api_returns_what_was_saved(qemu: str, tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    with source_vm(qemu, tmp_path, paused=False) as (vm, sock):

        async def save() -> vmtransport.SaveResult:
            with trio.fail_after(TIMEOUT):
                return await vmtransport.save_vm(sock, f"odirect:{image}", name="other")

        result = trio.run(save)
        assert result.stopped and result.after == "pause" and result.runstate == "postmigrate"
        assert result.vm.name == "web1" and result.vm.runstate == "running"
        assert result.bytes == image.stat().st_size - 65536 > MEM_MIB << 20
        assert result.migration["status"] == "completed"
        assert image_metadata(image)["name"] == "other"
        assert vm.status() == "postmigrate"


def test_missing_directory_leaves_the_vm_alone(qemu: str, tmp_path: Path) -> None:
    image = tmp_path / "missing" / "x.img"
    with source_vm(qemu, tmp_path, paused=False) as (vm, sock):
        before = customise(vm)
        result = save_cli(sock, f"file:{image}")
        assert result.returncode == 1
        assert result.stderr.startswith("vmtransport: error: ") and result.stderr.count("\n") == 1
        assert str(image.parent) in result.stderr
        assert vm.status() == "running"
        assert migration_settings(vm) == before
        assert vm.query_migrate().get("status", "none") == "none"
    assert not image.parent.exists()


def test_not_a_monitor(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    start = time.monotonic()
    result = save_cli(str(plain), f"file:{tmp_path / 'x.img'}")
    assert time.monotonic() - start < 10
    assert result.returncode == 1
    assert result.stderr == (
        f"vmtransport: error: QMP monitor {plain}: not a socket (a regular file)\n"
    )
    assert not (tmp_path / "x.img").exists()


def test_after_needs_qmp(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(VMT), "save", f"file:{tmp_path / 'x'}", "--after", "quit"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == "vmtransport: error: --after applies to a save with --qmp only\n"


@pytest.mark.fault(
    "save --qmp: migrate_cancel from elsewhere",
    direction="qmp",
    vm="resumed, settings put back",
    disk="no image",
    exit="1",
    message="QEMU's migration cancelled",
)
def test_migrate_cancel_from_elsewhere(qemu: str, tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    # A sink that holds the stream up, so that the cancel lands mid-save.
    uri = f"exec:sleep 2; cat > {image}"
    with source_vm(qemu, tmp_path, paused=False, mem_mib=BIG_MIB) as (vm, sock):
        before = customise(vm)
        with subprocess.Popen(
            [str(VMT), "save", "--qmp", sock, uri], stderr=subprocess.PIPE, text=True
        ) as proc:
            wait_active(vm, proc)
            vm.cmd("migrate_cancel")
            _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 1
        assert err == (
            f"vmtransport: error: QMP monitor {sock}: QEMU's migration cancelled: cancelled "
            "(the VM is running, its migration settings as they were)\n"
        )
        assert vm.status() == "running"
        assert migration_settings(vm) == before


@pytest.mark.fault(
    "save --qmp: the target fails mid-save",
    direction="qmp",
    vm="resumed, settings put back",
    disk="no image",
    exit="1",
    message="the command's error",
)
@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_failing_target_rolls_back(qemu: str, tmp_path: Path, paused: bool) -> None:
    with source_vm(qemu, tmp_path, paused=paused, mem_mib=BIG_MIB) as (vm, sock):
        before = customise(vm)
        state = vm.status()
        result = save_cli(sock, "exec:head -c 1000000 >/dev/null; echo disk on fire >&2; exit 3")
        assert result.returncode == 1
        lines = result.stderr.splitlines()
        assert lines[0] == "disk on fire"
        assert lines[-1].startswith("vmtransport: error: exec:head -c 1000000 >/dev/null; ")
        assert "exited with status 3" in lines[-1]
        assert lines[-1].endswith(f" (the VM is {state}, its migration settings as they were)")
        assert vm.status() == state
        assert migration_settings(vm) == before
        assert vm.query_migrate()["status"] in {"cancelled", "failed"}


@pytest.mark.fault(
    "save --qmp: QEMU killed mid-save",
    direction="qmp",
    vm="gone",
    disk="no image",
    exit="1",
    message="the monitor closed, or the stream ended early",
)
def test_qemu_killed_mid_save(qemu: str, tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    with source_vm(qemu, tmp_path, paused=False, mem_mib=BIG_MIB) as (vm, sock):
        with subprocess.Popen(
            [str(VMT), "save", "--qmp", sock, f"exec:sleep 2; cat > {tmp_path / 'x.cat'}"],
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            wait_active(vm, proc)
            vm.kill()
            start = time.monotonic()
            _, err = proc.communicate(timeout=TIMEOUT)
            assert time.monotonic() - start < 10
    assert proc.returncode == 1
    assert err.startswith("vmtransport: error: ") and err.count("\n") == 1, err
    assert err.endswith(" (the VM's state is unknown)\n"), err
    assert not image.exists()


@pytest.mark.fault(
    "save --qmp: a signal mid-save",
    direction="qmp",
    vm="resumed, settings put back",
    disk="no image",
    exit="128 + the signal",
    message="interrupted by SIG... (the VM is running, ...)",
)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=str)
def test_signal_mid_save_rolls_back(qemu: str, tmp_path: Path, sig: signal.Signals) -> None:
    image = tmp_path / "x.img"
    with source_vm(qemu, tmp_path, paused=False, mem_mib=BIG_MIB) as (vm, sock):
        before = customise(vm)
        # odirect: behind a slow first write would need a slow disk: an exec: target
        # that holds the stream up keeps the migration active long enough.
        uri = f"exec:sleep 3; cat > {image}"
        with subprocess.Popen(
            [str(VMT), "save", "--qmp", sock, uri], stderr=subprocess.PIPE, text=True
        ) as proc:
            wait_active(vm, proc)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 128 + sig
        assert err == (
            f"vmtransport: error: interrupted by {sig.name} "
            "(the VM is running, its migration settings as they were)\n"
        )
        assert vm.status() == "running"
        assert vm.query_migrate()["status"] == "cancelled"
        assert migration_settings(vm) == before


def test_sigkill_leaves_what_the_docs_say(qemu: str, tmp_path: Path) -> None:
    # docs/qmp.md: no rollback; QEMU's migration fails on the broken pipe, the VM stays
    # stopped, the save's settings stay.
    with source_vm(qemu, tmp_path, paused=False, mem_mib=BIG_MIB) as (vm, sock):
        customise(vm)
        with subprocess.Popen(
            [str(VMT), "save", "--qmp", sock, "exec:sleep 3; cat > /dev/null"],
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            wait_active(vm, proc)
            proc.kill()
            proc.communicate(timeout=TIMEOUT)
        deadline = time.monotonic() + 30
        while vm.query_migrate()["status"] not in {"failed", "completed"}:
            assert time.monotonic() < deadline, vm.query_migrate()
            time.sleep(0.05)
        assert vm.query_migrate()["status"] == "failed"
        assert vm.status() == "paused"
        caps, bandwidth, downtime = migration_settings(vm)
        assert not caps["xbzrle"] and caps["events"] and bandwidth > 12345678
        assert downtime == 1


def test_migration_already_running_is_refused(qemu: str, tmp_path: Path) -> None:
    with source_vm(qemu, tmp_path, paused=False) as (vm, sock):
        vm.migrate("exec:sleep 5; cat > /dev/null")
        result = save_cli(sock, f"file:{tmp_path / 'x.img'}")
        assert result.returncode == 2
        assert result.stderr == (
            f"vmtransport: error: QMP monitor {sock}: a migration is already active\n"
        )
        vm.cmd("migrate_cancel")
    assert not (tmp_path / "x.img").exists()


def test_api_with_an_open_client_and_its_events(qemu: str, tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    with source_vm(qemu, tmp_path, paused=False) as (vm, sock):

        async def save() -> tuple[vmtransport.SaveResult, list[Any], str]:
            with trio.fail_after(TIMEOUT):
                async with await qmp.connect(sock) as client:
                    with client.listen("STOP", "RESUME", "MIGRATION") as events:
                        result = await vmtransport.save_vm(client, f"file:{image}", after="resume")
                        # The client stays open, and saw what the save did.
                        status = (await client.execute("query-status"))["status"]
                        seen = []
                        while (event := events.get_nowait()) is not None:
                            seen.append((event.name, event.data.get("status")))
            return result, seen, status

        result, seen, status = trio.run(save)
        assert result.runstate == status == "running"
        assert seen[0] == ("STOP", None) and seen[-1] == ("RESUME", None)
        statuses = [s for name, s in seen if name == "MIGRATION"]
        assert statuses[0] == "setup" and statuses[-1] == "completed", seen
        assert vm.status() == "running"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: too small for the 64 MiB guest."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.root
@pytest.mark.fault(
    "save --qmp: disk full mid-save",
    direction="qmp",
    vm="as it was, settings put back",
    disk="no image, no temporary",
    exit="1",
    message="No space left on device",
)
@pytest.mark.parametrize("kind", ["file", "odirect"])
@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_disk_full_mid_save(
    qemu: str, tmp_path: Path, small_fs: Path, kind: str, paused: bool
) -> None:
    image = small_fs / "x.img"
    with source_vm(qemu, tmp_path, paused=paused, mem_mib=BIG_MIB) as (vm, sock):
        before = customise(vm)
        state = vm.status()
        result = save_cli(sock, f"{kind}:{image}")
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1, result.stderr
        assert "No space left on device" in result.stderr and str(image) in result.stderr
        assert result.stderr.endswith(
            f" (the VM is {state}, its migration settings as they were)\n"
        ), result.stderr
        assert vm.status() == state
        assert migration_settings(vm) == before
    assert list(small_fs.iterdir()) == []
