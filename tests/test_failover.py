"""``save --qmp`` of a VM with a virtio-net failover pair (and ``--pause-vm``), against
real QEMU 7.2 and 10.0 with the guest played through qtest (tests/failover_guest.py):
the VM runs until the guest unplugs the primary, then stops before RAM is copied; a
guest that never lets go, a paused guest or a signal leave the VM running with its
primary plugged back and no image.

The witness that a primary is plugged: a new migration asks the guest to unplug it
(``UNPLUG_PRIMARY``); QEMU asks only while it is plugged (query-pci lists it either way).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from failover_guest import PRIMARY, STANDBY, FailoverVM, failover_vm
from helpers import VMT
from qemuvm import describe_difference, files_equal
from qmp_vms import destination, source_vm

pytestmark = pytest.mark.qemu
TIMEOUT = 120
#: QEMU keeps a cancelled migration in ``cancelling`` for up to 30 s while it waits for
#: an unplug it asked the guest for; the save's bound on it is 45 s.
CANCEL_BOUND = 45.0


def start_save(fo: FailoverVM, image: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(VMT), "save", "--qmp", fo.sock, f"file:{image}", "--events", "json", *args],
        stderr=subprocess.PIPE,
        text=True,
    )


def events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines()]


def inspect(image: Path) -> dict[str, Any]:
    done = subprocess.run(
        [str(VMT), "inspect", "--json", str(image)], capture_output=True, text=True, check=True
    )
    return dict(json.loads(done.stdout))


def running_with_primary(fo: FailoverVM) -> None:
    fo.guest.negotiate()
    fo.plug_primary()
    fo.vm.cmd("cont")


def eject_when_asked(fo: FailoverVM, delay: float = 0.5) -> None:
    """The guest's driver: it ejects the primary ``delay`` s after QEMU asked."""
    assert fo.vm.qmp.wait_event("UNPLUG_PRIMARY", timeout=30)["data"] == {"device-id": PRIMARY}
    time.sleep(delay)
    fo.eject()


def assert_primary_plugged(fo: FailoverVM, tmp: Path) -> None:
    """A new migration asks the guest to unplug the primary: it is plugged. The guest
    then ejects it, so the witness migration completes (and leaves the VM postmigrate)."""
    fo.vm.migrate(f"exec:cat > {tmp / 'witness'}")
    eject_when_asked(fo, 0.0)
    assert fo.vm.wait_migration(timeout=60)["status"] == "completed"


def assert_no_image(tmp: Path) -> None:
    """Nothing under the image's name, nor a temporary beside it."""
    assert list(tmp.glob("a.sav*")) == []


def settings(fo: FailoverVM) -> tuple[Any, ...]:
    params = fo.vm.cmd("query-migrate-parameters")
    caps = {c["capability"]: c["state"] for c in fo.vm.cmd("query-migrate-capabilities")}
    return params["max-bandwidth"], params["downtime-limit"], caps


def test_guest_unplugs_then_the_vm_stops(qemu: str, tmp_path: Path) -> None:
    """The guest gets the time it needs: the VM runs through ``wait-unplug`` (1.5 s
    here), stops the moment the primary is out, and the stream records ``paused``. The
    progress events say whom the save waits for, and for how long; the image records
    the pair. ``--after resume`` runs the VM again and has QEMU plug the primary back."""
    image = tmp_path / "a.sav"
    with failover_vm(qemu, tmp_path) as fo:
        running_with_primary(fo)
        before = settings(fo)
        proc = start_save(fo, image, "--after", "resume")
        eject_when_asked(fo, 1.5)
        assert fo.vm.status() == "running", "the VM stopped before the guest unplugged"
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        assert fo.vm.status() == "running"
        assert settings(fo) == before
        evs = events(err)
        failover = [(e["state"], e.get("detail")) for e in evs if e.get("source") == "failover"]
        assert failover[:3] == [
            ("plugged", f"failover primary {PRIMARY}"),
            ("wait-unplug", f"waiting for the guest to unplug {PRIMARY}"),
            ("unplugged", f"{PRIMARY} unplugged"),
        ], failover
        assert failover[-1] == ("plugged", f"{PRIMARY} plugged back"), failover
        waited = [e["unplug"]["waited"] for e in evs if "unplug" in e]
        assert waited and max(waited) >= 1.0, waited  # seconds waited, in the events
        assert all(e["unplug"]["devices"] == PRIMARY for e in evs if "unplug" in e)
        # The VM was stopped after the unplug, before the copy: the stream says paused.
        doc = inspect(image)
        assert doc["stream"]["runstate"] == "paused"
        vm = doc["image"]["metadata"]["vm"]
        assert vm["failover"] == [{"standby": STANDBY, "primary": PRIMARY}]
        assert vm["runstate"] == "running"
        result = evs[-1]
        assert result["event"] == "result" and result["unplug_seconds"] >= 1.5
        # RAM sent while the VM still ran: a few pages at most (the bandwidth held).
        assert result["sent_running"] < 1 << 20, result
        assert_primary_plugged(fo, tmp_path)


@pytest.mark.fault(
    "save --qmp: the guest never unplugs the failover primary",
    direction="qmp",
    vm="running, primary plugged back, settings put back",
    disk="no image",
    exit="1",
    message="the guest did not unplug failover primary ID within N s",
)
def test_guest_never_unplugs(qemu: str, tmp_path: Path) -> None:
    image = tmp_path / "a.sav"
    with failover_vm(qemu, tmp_path) as fo:
        running_with_primary(fo)
        before = settings(fo)
        t0 = time.monotonic()
        proc = start_save(fo, image, "--unplug-timeout", "3")
        _, err = proc.communicate(timeout=TIMEOUT)
        took = time.monotonic() - t0
        assert proc.returncode == 1, err
        error = events(err)[-1]
        assert error["event"] == "error"
        assert f"did not unplug failover primary {PRIMARY} within 3 s" in error["message"]
        assert error["message"].endswith(f"failover primary {PRIMARY} plugged back)")
        assert 3 <= took < 3 + CANCEL_BOUND, took
        assert fo.vm.status() == "running"
        assert fo.vm.query_migrate()["status"] == "cancelled"
        assert settings(fo) == before
        assert_no_image(tmp_path)
        assert_primary_plugged(fo, tmp_path)


@pytest.mark.fault(
    "save --qmp: a paused guest cannot unplug its failover primary",
    direction="qmp",
    vm="untouched (paused)",
    disk="no image",
    exit="1",
    message="the guest cannot unplug failover primary ID: the VM is paused",
)
def test_paused_guest_is_refused_at_once(qemu: str, tmp_path: Path) -> None:
    image = tmp_path / "a.sav"
    with failover_vm(qemu, tmp_path) as fo:
        running_with_primary(fo)
        fo.vm.cmd("stop")
        t0 = time.monotonic()
        proc = start_save(fo, image, "--pause-vm")
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 1, err
        assert time.monotonic() - t0 < 5
        message = events(err)[-1]["message"]
        assert f"the guest cannot unplug failover primary {PRIMARY}: the VM is paused" in message
        assert fo.vm.status() == "paused"
        assert fo.vm.query_migrate().get("status", "none") == "none"  # never started
        assert_no_image(tmp_path)


@pytest.mark.fault(
    "save --qmp: the VM stops while the guest is to unplug",
    direction="qmp",
    vm="paused (as it was made), primary plugged back, settings put back",
    disk="no image",
    exit="1",
    message="the guest cannot unplug failover primary ID any more: the VM is paused",
)
def test_vm_stopped_while_waiting_is_cancelled_at_once(qemu: str, tmp_path: Path) -> None:
    """Someone pauses the VM during ``wait-unplug``: the save does not wait for its
    timeout. (The qtest guest then ejects during the cancel, which a paused guest could
    not, only so that QEMU's cancel ends in a second, not in 30.)"""
    image = tmp_path / "a.sav"
    with failover_vm(qemu, tmp_path) as fo:
        running_with_primary(fo)
        proc = start_save(fo, image, "--unplug-timeout", "60")
        fo.vm.qmp.wait_event("UNPLUG_PRIMARY", timeout=30)
        t0 = time.monotonic()
        fo.vm.cmd("stop")
        fo.vm.qmp.wait_event("MIGRATION", timeout=10, match={"status": "cancelling"})
        assert time.monotonic() - t0 < 2
        fo.eject()
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 1, err
        message = events(err)[-1]["message"]
        assert f"cannot unplug failover primary {PRIMARY} any more: the VM is paused" in message
        assert fo.vm.query_migrate()["status"] == "cancelled"
        assert_no_image(tmp_path)


@pytest.mark.fault(
    "save --qmp: a signal while the guest is to unplug",
    direction="qmp",
    vm="running, primary plugged back, settings put back",
    disk="no image",
    exit="143",
    message="interrupted by SIGTERM (the VM is running, ..., failover primary ID plugged back)",
)
def test_sigterm_while_waiting_for_the_unplug(qemu: str, tmp_path: Path) -> None:
    image = tmp_path / "a.sav"
    with failover_vm(qemu, tmp_path) as fo:
        running_with_primary(fo)
        before = settings(fo)
        proc = start_save(fo, image)
        fo.vm.qmp.wait_event("MIGRATION", timeout=30, match={"status": "wait-unplug"})
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 143, err
        assert time.monotonic() - t0 < CANCEL_BOUND + 5
        error = events(err)[-1]
        assert "SIGTERM" in error["message"], error
        assert error["vm"].endswith(f"failover primary {PRIMARY} plugged back"), error
        assert fo.vm.status() == "running"
        assert fo.vm.query_migrate()["status"] == "cancelled"
        assert settings(fo) == before
        assert_no_image(tmp_path)
        assert_primary_plugged(fo, tmp_path)


def stopped_stream_size(fo: FailoverVM, tmp: Path) -> int:
    """The length of a stop-then-save of the same VM (QEMU's own ``migrate`` into a
    file): one pass over RAM as it is now."""
    fo.vm.cmd("stop")
    stream = tmp / "stopped.stream"
    fo.vm.migrate(f"exec:cat > {stream}")
    assert fo.vm.wait_migration(timeout=60)["status"] == "completed"
    return stream.stat().st_size


#: A target that takes the stream at about 40 MiB/s (QEMU's migration then lasts ~3 s
#: for 128 MiB, long enough for a running busy guest to dirty a good part of its RAM).
SLOW_CAT = (
    "python3 -c 'import sys, time\n"
    "while b := sys.stdin.buffer.read(1 << 20): sys.stdout.buffer.write(b); time.sleep(0.025)'"
)


def test_busy_guest_pause_vm_is_one_pass(qemu: str, tmp_path: Path) -> None:
    """A guest whose vCPU rewrites all its RAM without pause (the dirtying BIOS of
    tests/failover_guest.py, which stops when the VM stops) and takes 1 s to unplug,
    saved with ``--pause-vm`` through a slow target: the stream is as long as a
    stop-then-save's (within 2 %), while the same guest migrated running sends at least
    5 % more (cut off after 3 s; 7-10 times as much measured).

    The guest runs on TCG: on this machine's KVM every first write to a page after a
    dirty-log sync faults (~12 MB/s), TCG writes ~750 MiB/s. And TCG's writes land in
    QEMU's own dirty bitmap, which keeps writes made while QEMU waited for the unplug
    (KVM's dirty log, cleared as pages are sent, forgets them): a save that kept
    iterating after the stop would send each such page twice."""
    image = tmp_path / "a.sav"
    mem = 128
    with failover_vm(qemu, tmp_path, mem_mib=mem, bios="dirty") as fo:
        fo.guest.arm_cpu_dirtier(1 << 20, mem << 20)
        running_with_primary(fo)
        deadline = time.monotonic() + 20  # a pass over 127 MiB: ~0.2 s, longer when busy
        while fo.guest.cpu_dirtier_passes() == 0:
            assert time.monotonic() < deadline, "the guest did not rewrite its RAM"
            time.sleep(0.1)
        target = f"exec:{SLOW_CAT} > {image}"
        proc = subprocess.Popen(
            [str(VMT), "save", "--qmp", fo.sock, target, "--events", "json", "--pause-vm"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        eject_when_asked(fo, 1.0)
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        length = events(err)[-1]["bytes"]
        fo.vm.cmd("cont")  # postmigrate -> running, busy again (the primary is out)
        stopped = stopped_stream_size(fo, tmp_path)
        assert abs(length - stopped) <= 0.02 * stopped, (length, stopped)
        # The counterfactual: the same guest migrated running, for 3 s at most.
        fo.vm.cmd("cont")
        fo.vm.cmd("migrate-set-parameters", {"downtime-limit": 1})  # as a save sets it
        fo.vm.migrate(f"exec:cat > {tmp_path / 'running.stream'}")
        deadline = time.monotonic() + 3
        info = fo.vm.query_migrate()
        while info["status"] in ("setup", "active") and time.monotonic() < deadline:
            time.sleep(0.1)
            info = fo.vm.query_migrate()
        sent = info["ram"]["transferred"]
        if info["status"] != "completed":
            fo.vm.cmd("migrate_cancel")
            fo.vm.wait_migration(timeout=60)
        print(f"pause-vm {length}, stopped {stopped}, running {info['status']} after {sent}")
        assert sent > 1.05 * stopped, (sent, stopped)


def test_restore_of_a_failover_vm(qemu: str, tmp_path: Path) -> None:
    """The destination has the same pair (its primary hidden until the standby is
    negotiated): ``restore --qmp`` loads the image, the primary is plugged (QEMU's
    ``FAILOVER_NEGOTIATED`` during the load, reported), RAM is byte-identical, and an
    image saved with ``--pause-vm`` comes up paused."""
    image = tmp_path / "a.sav"
    with failover_vm(qemu, tmp_path) as src:
        running_with_primary(src)
        proc = start_save(src, image, "--pause-vm")
        eject_when_asked(src, 0.2)
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        src_ram = src.ram_file
        with failover_vm(qemu, tmp_path, name="dst", incoming=True) as dst:
            done = subprocess.run(
                [str(VMT), "restore", "--qmp", dst.sock, f"file:{image}", "--events", "json"],
                capture_output=True, text=True, timeout=TIMEOUT,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            evs = events(done.stderr)
            failover = [(e["state"], e.get("detail")) for e in evs if e.get("source") == "failover"]
            assert ("negotiated", f"{PRIMARY} plugged (standby {STANDBY} negotiated)") in failover
            assert dst.vm.status() == "paused"  # --pause-vm
            assert files_equal(src_ram, dst.ram_file), describe_difference(src_ram, dst.ram_file)
            assert dst.vm.cmd("qom-get", path=f"/machine/peripheral/{PRIMARY}", property="type")


def test_pause_vm_without_a_failover_pair(qemu: str, tmp_path: Path) -> None:
    """No failover pair: ``--pause-vm`` is a stop-then-save whose image restores paused
    (the plain save of the same running VM restores running)."""
    with source_vm(qemu, tmp_path, paused=False) as (vm, sock):
        for flags, expected in ((["--pause-vm"], "paused"), ([], "running")):
            image = tmp_path / f"{expected}.sav"
            done = subprocess.run(
                [str(VMT), "save", "--qmp", sock, f"file:{image}", *flags, "--after", "resume"],
                capture_output=True, text=True, timeout=TIMEOUT,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert vm.status() == "running"
            doc = inspect(image)
            assert doc["stream"]["runstate"] == "paused"  # stopped before the copy
            assert "failover" not in doc["image"]["metadata"]["vm"]
            with destination(qemu, tmp_path) as (dst, dsock):
                done = subprocess.run(
                    [str(VMT), "restore", "--qmp", dsock, f"file:{image}"],
                    capture_output=True, text=True, timeout=TIMEOUT,
                )  # fmt: skip
                assert done.returncode == 0, done.stderr
                assert dst.status() == expected


def test_restore_warns_when_the_primary_does_not_come(qemu: str, tmp_path: Path) -> None:
    """A destination started without the primary: QEMU cannot plug it. The restore
    waits ``--failover-timeout``, says so (a warning, state ``not-negotiated``) and
    succeeds: the VM is restored, without that NIC."""
    image = tmp_path / "a.sav"
    with failover_vm(qemu, tmp_path) as src:
        running_with_primary(src)
        proc = start_save(src, image)
        eject_when_asked(src, 0.2)
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
    with failover_vm(qemu, tmp_path, name="dst", incoming=True, primary_on_cmdline=False) as dst:
        t0 = time.monotonic()
        done = subprocess.run(
            [str(VMT), "restore", "--qmp", dst.sock, f"file:{image}", "--events", "json",
             "--failover-timeout", "1"],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - t0 < 20
        evs = events(done.stderr)
        failover = [(e["state"], e.get("detail")) for e in evs if e.get("source") == "failover"]
        assert failover == [("not-negotiated", f"{PRIMARY} not plugged")], failover
        warning = [e["text"] for e in evs if e["event"] == "output"]
        assert any(f"failover primary {PRIMARY} not plugged within 1 s" in w for w in warning)
        result = evs[-1]
        assert result["event"] == "result" and result["failover_missing"] == [PRIMARY]
        assert dst.vm.status() == "running"  # saved running, restored running


PANIC = ["-device", "pvpanic", "-action", "panic=pause"]  # a crash leaves guest-panicked


@pytest.mark.fault(
    "save --qmp: a crashed guest cannot unplug its failover primary",
    direction="qmp",
    vm="untouched (guest-panicked)",
    disk="no image",
    exit="1",
    message="the guest cannot unplug failover primary ID: the VM is guest-panicked",
)
def test_crashed_guest_is_refused_at_once(qemu: str, tmp_path: Path) -> None:
    """The guest reports a panic (pvpanic, as Linux does) and QEMU stops it: the save
    is refused before any migration, naming the state."""
    image = tmp_path / "a.sav"
    with failover_vm(qemu, tmp_path, extra_args=PANIC) as fo:
        running_with_primary(fo)
        fo.guest.outb(0x505, 1)  # PVPANIC_PANICKED
        fo.vm.qmp.wait_event("GUEST_PANICKED", timeout=10)
        assert fo.vm.status() == "guest-panicked"
        t0 = time.monotonic()
        proc = start_save(fo, image)
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 1, err
        assert time.monotonic() - t0 < 5
        message = events(err)[-1]["message"]
        assert f"cannot unplug failover primary {PRIMARY}: the VM is guest-panicked" in message
        assert fo.vm.query_migrate().get("status", "none") == "none"
        assert_no_image(tmp_path)


@pytest.mark.fault(
    "save --qmp: the guest crashes while it is to unplug",
    direction="qmp",
    vm="guest-panicked (as the crash left it), settings put back",
    disk="no image",
    exit="1",
    message="the guest cannot unplug failover primary ID any more: the VM is guest-panicked",
)
def test_guest_crash_while_waiting_is_cancelled_at_once(qemu: str, tmp_path: Path) -> None:
    """(The qtest guest ejects during the cancel only so that QEMU's cancel ends in a
    second, not in 30.)"""
    image = tmp_path / "a.sav"
    with failover_vm(qemu, tmp_path, extra_args=PANIC) as fo:
        running_with_primary(fo)
        proc = start_save(fo, image, "--unplug-timeout", "60")
        fo.vm.qmp.wait_event("UNPLUG_PRIMARY", timeout=30)
        t0 = time.monotonic()
        fo.guest.outb(0x505, 1)
        fo.vm.qmp.wait_event("MIGRATION", timeout=10, match={"status": "cancelling"})
        assert time.monotonic() - t0 < 2
        fo.eject()
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 1, err
        message = events(err)[-1]["message"]
        assert f"unplug failover primary {PRIMARY} any more: the VM is guest-panicked" in message
        assert fo.vm.status() == "guest-panicked"
        assert_no_image(tmp_path)
