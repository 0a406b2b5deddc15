"""``vmtransport restore --qmp SOCKET URI`` and ``vmtransport.restore_vm``, against real
QEMU 7.2 and 10.0 started with ``-incoming defer``: ``--qmp`` saves round trip into a
destination whose RAM is byte-identical to the source's and whose run state is what
the image recorded (or what ``--running``/``--paused`` said); ``exec:`` images restore
through ``--qmp``; a damaged image never lets the destination run and the one error
line names the damage; a monitor that is not QEMU's fails within seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import MEM_MIB, VMT, Saved, damage, one_error_line
from qemuvm import VM, describe_difference, files_equal
from qmp_vms import destination, qmp_socket, source_vm

import vmtransport
from vmtransport import qmp
from vmtransport.image._libvirt import build_libvirt_header

pytestmark = pytest.mark.qemu
TIMEOUT = 120


def vmt_qmp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VMT), *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def capabilities(vm: VM) -> dict[str, bool]:
    return {c["capability"]: c["state"] for c in vm.cmd("query-migrate-capabilities")}


def customise(vm: VM) -> dict[str, bool]:
    """A capability a restore must switch off and put back."""
    vm.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True}]})
    caps = capabilities(vm)
    assert caps["xbzrle"] and not caps["events"]
    return caps


def never_ran(vm: VM) -> str:
    """The destination's fate after a failed restore: it exited (QEMU's policy for a
    failed incoming migration) or it is still not running. Returns which."""
    deadline = time.monotonic() + 30
    while vm.returncode is None:
        try:
            status = vm.status()
        except Exception:
            continue  # exiting
        assert status in ("inmigrate", "paused", "prelaunch"), status
        if time.monotonic() > deadline:
            return status
        time.sleep(0.05)
    return f"exit {vm.returncode}"


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_qmp_save_then_qmp_restore(qemu: str, tmp_path: Path, paused: bool) -> None:
    image = tmp_path / "web1.img"
    with source_vm(qemu, tmp_path, paused=paused) as (vm, sock):
        result = vmt_qmp("save", "--qmp", sock, f"file:{image}")
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
        src_ram = vm.ram_file
        # The recorded run state: running, or prelaunch for a VM started with -S.
        recorded = "prelaunch" if paused else "running"
        # Not running, QEMU loads the stream's own state: a VM the save stopped is paused.
        loaded = "prelaunch" if paused else "paused"
        for option, expected in [
            ("", recorded),
            ("--running", "running"),
            ("--paused", loaded),
        ]:
            with destination(qemu, tmp_path) as (dst, dsock):
                before = customise(dst)
                args = ["restore", "--qmp", dsock, f"file:{image}", *filter(None, [option])]
                result = vmt_qmp(*args)
                assert (result.returncode, result.stderr) == (0, ""), (option, result.stderr)
                assert dst.status() == expected, option
                assert dst.query_migrate()["status"] == "completed"
                assert capabilities(dst) == before
                assert files_equal(src_ram, dst.ram_file), describe_difference(
                    src_ram, dst.ram_file
                )


def test_exec_image_restores_through_qmp(qemu: str, tmp_path: Path, saved: Saved) -> None:
    # The session's image and raw stream were written through exec: from a VM started
    # with -S: the stream records prelaunch, and the destination stays there.
    for uri in (f"file:{saved.image}", f"file:{saved.raw}", f"odirect:{saved.image}"):
        with destination(qemu, tmp_path, bios=False) as (dst, dsock):
            result = vmt_qmp("restore", "--qmp", dsock, uri)
            assert (result.returncode, result.stderr) == (0, ""), (uri, result.stderr)
            assert dst.status() == "prelaunch", uri
            assert files_equal(saved.src_ram, dst.ram_file), describe_difference(
                saved.src_ram, dst.ram_file
            )


def test_exec_save_of_a_running_vm_through_qmp(qemu: str, tmp_path: Path) -> None:
    """A live exec: save of a running VM records ``running`` in its stream: QEMU without
    -S starts it by itself on load, with -S restore_vm does; ``--paused`` stops it
    again at once, or never starts it."""
    image = tmp_path / "live.img"
    with source_vm(qemu, tmp_path, paused=False) as (vm, _):
        vm.migrate(f"exec:{VMT} save file:{image} 2>{tmp_path / 'save.err'}")
        assert vm.wait_migration(timeout=TIMEOUT)["status"] == "completed"
        assert (tmp_path / "save.err").read_text() == ""
        src_ram = vm.ram_file
        for stopped in (False, True):
            for option, expected in [("", "running"), ("--paused", "paused")]:
                with destination(qemu, tmp_path, stopped=stopped) as (dst, dsock):
                    args = ["-v", "restore", "--qmp", dsock, f"file:{image}"]
                    result = vmt_qmp(*args, *filter(None, [option]))
                    assert result.returncode == 0, result.stderr
                    assert "recorded running" in result.stderr
                    assert dst.status() == expected, (stopped, option)
                    assert files_equal(src_ram, dst.ram_file), describe_difference(
                        src_ram, dst.ram_file
                    )


def test_libvirt_image_through_qmp(qemu: str, tmp_path: Path, saved: Saved) -> None:
    """A ``virsh save`` image: its header's was_running says what the VM was."""
    for running, expected in [(True, "running"), (False, "prelaunch")]:
        image = tmp_path / "lv.sav"
        with open(image, "wb") as f:
            f.write(build_libvirt_header("<domain><name>lv</name></domain>", was_running=running))
            f.write(saved.cat.read_bytes())
        with destination(qemu, tmp_path, bios=False) as (dst, dsock):
            result = vmt_qmp("-v", "restore", "--qmp", dsock, f"file:{image}")
            assert result.returncode == 0, result.stderr
            assert f"recorded {'running' if running else 'paused'}, VM {expected}" in result.stderr
            assert dst.status() == expected
            if not running:  # (a running one runs SeaBIOS, which writes RAM)
                assert files_equal(saved.src_ram, dst.ram_file)


def test_api_restore_vm(qemu: str, tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    with source_vm(qemu, tmp_path, paused=False) as (_, sock):

        async def round_trip(dsock: str) -> tuple[Any, Any, list[Any], list[str]]:
            progress: list[Any] = []
            states: list[str] = []
            with trio.fail_after(TIMEOUT):
                saved = await vmtransport.save_vm(sock, f"file:{image}")
                async with await qmp.connect(dsock) as client:
                    with client.listen("RESUME") as events:
                        restored = await vmtransport.restore_vm(
                            client,
                            f"file:{image}",
                            on_progress=progress.append,
                            on_event=lambda e: states.append(e.state),
                        )
                        assert events.get_nowait() is not None  # restore_vm resumed it
            return saved, restored, progress, states

        with destination(qemu, tmp_path) as (dst, dsock):
            saved, restored, progress, states = trio.run(round_trip, dsock)
            assert isinstance(restored, vmtransport.RestoreResult)
            # The image's bytes: its header and the stream.
            assert restored.bytes == image.stat().st_size == saved.bytes + 65536
            assert restored.seconds > 0 and restored.mib_per_s > 0
            assert (restored.recorded, restored.recorded_by) == ("running", "vm")
            assert restored.state == "" and restored.runstate == "running"
            assert restored.image["vm"]["name"] == "web1"
            assert restored.migration["status"] == "completed"
            assert progress and progress[-1].bytes == restored.bytes
            assert states[0] == "started" and states[-1] == "complete"
            assert dst.status() == "running"


# -- refusals and failures -----------------------------------------------------------


@pytest.mark.fault(
    "restore --qmp: a damaged image (payload byte flipped, truncated)",
    direction="qmp",
    vm="never runs (QEMU's load fails; QEMU exits)",
    disk="image unchanged",
    exit="1",
    message="checksum mismatch / image truncated (the VM never ran)",
)
@pytest.mark.parametrize("how", ["payload-flip", "truncated-mid", "truncated-tail"])
def test_damaged_image_never_runs(qemu: str, tmp_path: Path, saved: Saved, how: str) -> None:
    bad = tmp_path / "bad.img"
    damage(saved, how, bad)
    with destination(qemu, tmp_path, bios=False) as (dst, dsock):
        start = time.monotonic()
        result = vmt_qmp("restore", "--qmp", dsock, f"file:{bad}")
        assert time.monotonic() - start < 30
        assert result.returncode == 1
        line = one_error_line(result.stderr)
        cause = "checksum mismatch" if how == "payload-flip" else "image truncated"
        assert line.startswith(f"vmtransport: error: file:{bad}: {cause}"), line
        assert "Broken pipe" not in line
        assert line.endswith("the VM never ran)"), line
        assert line.endswith(" (QEMU exited; the VM never ran)"), line
        # QEMU's policy for a failed incoming migration: it exits.
        assert never_ran(dst) == "exit 1"


@pytest.mark.fault(
    "restore --qmp: QEMU refuses the stream (a destination of another RAM size)",
    direction="qmp",
    vm="never runs (QEMU exits)",
    disk="image unchanged",
    exit="1",
    message="the image ... its checksum holds, so the consumer refused it (QEMU: see its log)",
)
def test_qemu_refuses_the_stream(qemu: str, tmp_path: Path, saved: Saved) -> None:
    with destination(qemu, tmp_path, bios=False, mem_mib=2 * MEM_MIB) as (dst, dsock):
        result = vmt_qmp("restore", "--qmp", dsock, f"file:{saved.image}")
        assert result.returncode == 1
        line = one_error_line(result.stderr)
        assert line.startswith(f"vmtransport: error: file:{saved.image}: the consumer "), line
        assert "its checksum holds, so the consumer refused it (QEMU: see its log)" in line
        assert line.endswith(" (QEMU exited; the VM never ran)"), line
        assert never_ran(dst) == "exit 1"
        assert "Size mismatch: mem: " in dst.log(), dst.log()  # QEMU's own reason


@pytest.mark.fault(
    "restore --qmp: an image refused before its first byte (partial, bad header, missing)",
    direction="qmp",
    vm="untouched: still waiting (a good restore then works)",
    disk="image unchanged",
    exit="1",
    message="why the image is refused (QEMU untouched)",
)
def test_refused_image_leaves_qemu_waiting(qemu: str, tmp_path: Path, saved: Saved) -> None:
    damage(saved, "partial", tmp_path / "partial.img")
    damage(saved, "header-flip", tmp_path / "header.img")
    (tmp_path / "text").write_text("hello\n" * 1000)
    sparse = build_libvirt_header("<domain/>", was_running=True, format="sparse")
    (tmp_path / "sparse.sav").write_bytes(sparse + saved.cat.read_bytes())
    with destination(qemu, tmp_path, bios=False) as (dst, dsock):
        for name, says in [
            ("partial.img", "the image is partial"),
            ("header.img", "CRC"),
            ("text", "neither a QEMU migration stream"),
            ("missing", "No such file"),
            ("sparse.sav", "'sparse' (mapped-ram) images are not supported"),
        ]:
            result = vmt_qmp("restore", "--qmp", dsock, f"file:{tmp_path / name}")
            assert result.returncode == 1, (name, result.stderr)
            line = one_error_line(result.stderr)
            assert says in line, line
            assert line.endswith("(QEMU untouched: still waiting for a migration)"), line
            assert dst.status() == "inmigrate"
            assert dst.query_migrate() == {}
        result = vmt_qmp("restore", "--qmp", dsock, f"file:{saved.image}")
        assert (result.returncode, result.stderr) == (0, "")
        assert dst.status() == "prelaunch"
        assert files_equal(saved.src_ram, dst.ram_file)


@pytest.mark.fault(
    "restore --qmp: QEMU not waiting for a migration (running, -incoming exec:, loaded)",
    direction="qmp",
    vm="untouched",
    disk="image unchanged",
    exit="2",
    message="QEMU is running, not waiting for a migration (start it with -incoming defer)",
)
def test_qemu_not_waiting(qemu: str, tmp_path: Path, saved: Saved) -> None:
    with source_vm(qemu, tmp_path, paused=False) as (vm, sock):
        result = vmt_qmp("restore", "--qmp", sock, f"file:{saved.image}")
        assert result.returncode == 2
        assert result.stderr == (
            f"vmtransport: error: QMP monitor {sock}: QEMU is running, not waiting for a "
            "migration (start it with -incoming defer)\n"
        )
        assert vm.status() == "running"
    bsock = qmp_socket("busy")
    args = ["-qmp", f"unix:{bsock},server=on,wait=off"]
    with VM(qemu, tmp_path, name="busy", incoming="exec:sleep 60", extra_args=args) as busy:
        # Waiting, but for a migration of its own (QEMU 10.0 reports it as set up).
        result = vmt_qmp("restore", "--qmp", bsock, f"file:{saved.image}")
        assert result.returncode == 2
        line = one_error_line(result.stderr)
        assert "(start it with -incoming defer)" in line, line
        assert busy.status() == "inmigrate"
        busy.kill()
    os.unlink(bsock)
    with destination(qemu, tmp_path, bios=False) as (_, dsock):
        assert vmt_qmp("restore", "--qmp", dsock, f"file:{saved.image}").returncode == 0
        result = vmt_qmp("restore", "--qmp", dsock, f"file:{saved.image}")
        assert result.returncode == 2
        assert "QEMU is prelaunch, not waiting for a migration" in one_error_line(result.stderr)


@pytest.mark.fault(
    "restore --qmp: a monitor that is not QEMU's (a plain file, a socket that never greets)",
    direction="qmp",
    vm="n/a",
    disk="n/a",
    exit="1",
    message="QMP monitor PATH: not a socket / sent no QMP greeting within 10 s",
)
def test_not_a_monitor(tmp_path: Path) -> None:
    image = tmp_path / "x.img"  # never opened: the monitor fails first
    plain = tmp_path / "plain"
    plain.write_text("")
    start = time.monotonic()
    result = vmt_qmp("restore", "--qmp", str(plain), f"file:{image}")
    assert time.monotonic() - start < 10
    assert (result.returncode, result.stderr) == (
        1,
        f"vmtransport: error: QMP monitor {plain}: not a socket (a regular file)\n",
    )
    path = qmp_socket("mute")
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(path)
        mute.listen()
        try:
            start = time.monotonic()
            result = vmt_qmp("restore", "--qmp", path, f"file:{image}")
            assert time.monotonic() - start < 20
        finally:
            os.unlink(path)
    assert (result.returncode, result.stderr) == (
        1,
        f"vmtransport: error: QMP monitor {path}: sent no QMP greeting within 10 s\n",
    )


@pytest.mark.fault(
    "restore --qmp: a signal mid-restore",
    direction="qmp",
    vm="never runs (QEMU's load fails; QEMU exits)",
    disk="image unchanged",
    exit="128 + the signal",
    message="interrupted by SIG... (QEMU exited; the VM never ran)",
)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=str)
def test_signal_mid_restore(qemu: str, tmp_path: Path, saved: Saved, sig: signal.Signals) -> None:
    # A source that stalls half way: the signal lands while QEMU holds half the RAM.
    half = saved.image.stat().st_size // 2
    uri = f"exec:head -c {half} {saved.image}; sleep 30; tail -c +{half + 1} {saved.image}"
    with destination(qemu, tmp_path, bios=False) as (dst, dsock):
        with subprocess.Popen(
            [str(VMT), "restore", "--qmp", dsock, uri], stderr=subprocess.PIPE, text=True
        ) as proc:
            deadline = time.monotonic() + 30
            while dst.query_migrate().get("status") != "active":
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.02)
            time.sleep(0.5)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 128 + sig, err
        assert err == (
            f"vmtransport: error: interrupted by {sig.name} (QEMU exited; the VM never ran)\n"
        )
        assert never_ran(dst) == "exit 1"


@pytest.mark.fault(
    "restore --qmp: QEMU killed mid-restore",
    direction="qmp",
    vm="gone",
    disk="image unchanged",
    exit="1",
    message="the consumer stopped reading ... its checksum holds (QEMU exited; the VM never ran)",
)
def test_qemu_killed_mid_restore(qemu: str, tmp_path: Path, saved: Saved) -> None:
    half = saved.image.stat().st_size // 2
    uri = f"exec:head -c {half} {saved.image}; sleep 3; tail -c +{half + 1} {saved.image}"
    with destination(qemu, tmp_path, bios=False) as (dst, dsock):
        with subprocess.Popen(
            [str(VMT), "restore", "--qmp", dsock, uri], stderr=subprocess.PIPE, text=True
        ) as proc:
            deadline = time.monotonic() + 30
            while dst.query_migrate().get("status") != "active":
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.02)
            dst.kill()
            _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1, err
    line = one_error_line(err)
    # The image was read to its end regardless: it is sound, QEMU went away.
    assert line.startswith("vmtransport: error: exec:head "), line
    assert "its checksum holds, so the consumer refused it" in line, line
    assert line.endswith(" (QEMU exited; the VM never ran)"), line


def test_state_needs_qmp(tmp_path: Path) -> None:
    result = vmt_qmp("restore", f"file:{tmp_path / 'x'}", "--paused")
    assert result.returncode == 2
    assert result.stderr == "vmtransport: error: --paused applies to a restore with --qmp only\n"
    result = vmt_qmp("restore", "--qmp", "x", "file:y", "--paused", "--running")
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def test_events_json_on_a_qmp_restore(qemu: str, tmp_path: Path, saved: Saved) -> None:
    """--events json on restore --qmp: JSON lines only, QEMU's states, the pipeline's
    progress up to the image's size, and a result naming the VM's final state; a
    damaged image gives an error event instead of the error line."""
    import json

    with destination(qemu, tmp_path, bios=False) as (dst, dsock):
        result = vmt_qmp("restore", "--qmp", dsock, "--events", "json", f"file:{saved.image}")
        assert result.returncode == 0, result.stderr
        events = [json.loads(line) for line in result.stderr.splitlines()]
        assert dst.status() == "prelaunch"
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "result", kinds
    qemu_states = [e["state"] for e in events if e["event"] == "state" and e["source"] == "qemu"]
    assert qemu_states[-1] == "completed", qemu_states
    final = events[-1]
    assert final["ok"] is True and final["vm"] == "prelaunch"
    assert final["bytes"] == saved.image.stat().st_size
    bad = tmp_path / "bad.img"
    damage(saved, "payload-flip", bad)
    with destination(qemu, tmp_path, bios=False) as (dst, dsock):
        failed = vmt_qmp("restore", "--qmp", dsock, "--events", "json", f"file:{bad}")
    assert failed.returncode == 1
    last = json.loads(failed.stderr.splitlines()[-1])
    assert last["event"] == "error" and "checksum mismatch" in last["message"], last
