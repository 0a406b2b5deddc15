"""The failover harness (tests/failover_guest.py) against real QEMU 7.2 and 10.0: the
qtest guest negotiates the standby, the primary plugs, a migration waits in
``wait-unplug`` until the guest ejects the primary, then completes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from failover_guest import PRIMARY, STANDBY, FailoverVM, failover_vm
from qemuvm import describe_difference, files_equal

pytestmark = pytest.mark.qemu


def test_migration_waits_for_the_guest_to_eject(qemu: str, tmp_path: Path) -> None:
    stream = tmp_path / "stream"
    with failover_vm(qemu, tmp_path) as fo:
        vm = fo.vm
        ev = fo.guest.negotiate()
        assert ev["data"] == {"device-id": STANDBY}
        fo.plug_primary()
        vm.cmd("cont")
        vm.migrate(f"exec:cat > {stream}")
        assert vm.qmp.wait_event("UNPLUG_PRIMARY", timeout=10)["data"] == {"device-id": PRIMARY}
        assert fo.unplug_requested()
        # The guest has not let go: QEMU waits however long (a second here).
        vm.qmp.wait_event("MIGRATION", timeout=10, match={"status": "wait-unplug"})
        time.sleep(1.0)
        assert vm.query_migrate()["status"] == "wait-unplug"
        held = stream.stat().st_size
        assert held < 4096, f"{held} bytes sent before the unplug"
        fo.eject()
        vm.qmp.wait_event("MIGRATION", timeout=10, match={"status": "active"})
        info = vm.wait_migration(timeout=60)
        assert info["status"] == "completed", info
        assert vm.status() == "postmigrate"
        assert stream.stat().st_size > fo.mem_mib << 20


def eject_and_complete(fo: FailoverVM, uri: str) -> dict[str, Any]:
    """Migrate to ``uri``; the guest ejects the primary when asked; wait for the end."""
    fo.vm.migrate(uri)
    fo.vm.qmp.wait_event("MIGRATION", timeout=10, match={"status": "wait-unplug"})
    fo.eject()
    return fo.vm.wait_migration(timeout=60)


def test_a_failed_migration_replugs_the_primary(qemu: str, tmp_path: Path) -> None:
    """After a completed migration the primary stays unplugged (QEMU does not ask again);
    a migration that fails at once plugs it back, which the bus link's name shows."""
    with failover_vm(qemu, tmp_path, random_ram=False) as fo:
        fo.guest.negotiate()
        fo.plug_primary()
        fo.vm.cmd("cont")
        assert fo.plug_generation() == 0
        assert eject_and_complete(fo, "exec:cat > /dev/null")["status"] == "completed"
        assert fo.plug_generation() == 0  # an unplug leaves the link alone
        fo.vm.cmd("cont")
        fo.vm.qmp.events.clear()
        fo.vm.migrate("unix:/nonexistent/vmtransport.sock")
        assert fo.vm.wait_migration(timeout=10)["status"] == "failed"
        assert fo.plug_generation() == 1
        assert fo.vm.status() == "running"
        assert fo.vm.qmp.take_event("UNPLUG_PRIMARY") is None
        # Plugged again: the next migration asks the guest to let go of it.
        fo.vm.migrate("exec:cat > /dev/null")
        fo.vm.qmp.wait_event("UNPLUG_PRIMARY", timeout=10)
        fo.eject()
        assert fo.vm.wait_migration(timeout=60)["status"] == "completed"


def test_busy_guest_paused_at_active_goes_in_one_pass(qemu: str, tmp_path: Path) -> None:
    """A guest whose vCPU rewrites its RAM; the migration held at 1 MiB/s, the VM stopped
    when QEMU goes active, then downtime-limit at its maximum: QEMU completes at once, so
    each page travels once. The destination plugs its primary during the load and its RAM
    equals the source's."""
    mem = 128
    stream = tmp_path / "stream"
    with failover_vm(qemu, tmp_path, mem_mib=mem, bios="dirty") as fo:
        fo.guest.negotiate()
        fo.plug_primary()
        fo.guest.arm_cpu_dirtier(1 << 20, mem << 20)
        fo.vm.cmd("cont")
        time.sleep(0.3)
        fo.vm.migrate(f"exec:cat > {stream}", max_bandwidth=1 << 20)
        fo.vm.qmp.wait_event("MIGRATION", timeout=10, match={"status": "wait-unplug"})
        time.sleep(0.3)  # the guest keeps dirtying while QEMU waits for it
        fo.eject()
        fo.vm.qmp.wait_event("MIGRATION", timeout=10, match={"status": "active"})
        fo.vm.cmd("stop")
        fo.vm.cmd("migrate-set-parameters", {"downtime-limit": 2_000_000})
        assert fo.vm.wait_migration(timeout=60)["status"] == "completed"
        passes = fo.guest.cpu_dirtier_passes()
        assert passes > 0, "the guest did not dirty its RAM"
        size = stream.stat().st_size
        assert size < (mem << 20) * 1.02, f"{size} bytes for {mem} MiB of RAM"
        with failover_vm(qemu, tmp_path, name="dst", incoming=True, mem_mib=mem) as dst:
            dst.vm.cmd("migrate-incoming", {"uri": f"exec:cat {stream}"})
            assert dst.vm.wait_incoming(timeout=60) == "paused"
            assert dst.vm.qmp.take_event("FAILOVER_NEGOTIATED") is not None
            assert dst.plug_generation() == 0  # the primary exists: plugged by the load
            assert files_equal(fo.ram_file, dst.ram_file), describe_difference(
                fo.ram_file, dst.ram_file
            )
