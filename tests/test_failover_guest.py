"""The failover harness (tests/failover_guest.py) against real QEMU 7.2 and 10.0: the
qtest guest negotiates the standby, the primary plugs, a migration waits in
``wait-unplug`` until the guest ejects the primary, then completes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from failover_guest import PRIMARY, STANDBY, failover_vm

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
