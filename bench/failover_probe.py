#!/usr/bin/env python3
"""What a ``save --qmp`` of a VM with a failover pair sends: its guest (played through
qtest, tests/failover_guest.py) rewrites its RAM from its vCPU (tests/failover_guest.py's
dirtying BIOS) and ejects the primary UNPLUG s after QEMU asks; with ``--dirtier qemu`` its
RAM is also rewritten through qtest while QEMU waits for the unplug (writes QEMU's own
dirty bitmap records, as it does a TCG guest's; KVM's dirty log, cleared as pages are
sent, forgets writes made before a page is sent).

    .venv/bin/python bench/failover_probe.py [--mem-mib 256] [--rounds 3] [--qemu 7.2,10.0]
        [--dirtier vcpu|qemu] [--accel tcg|kvm]

The guest runs on TCG by default: on this machine's KVM every first write to a page after
a dirty-log sync faults (~12 MB/s of writes); TCG writes ~750 MiB/s.

Per round and QEMU, one VM after another (order rotated):
- ``shipped``: ``save_vm(..., pause_vm=True)`` as shipped (``max-bandwidth`` held until
  the stop, then ``downtime-limit`` at its maximum: QEMU completes in one pass);
- ``lifted``: the same, but the hold lifted after the stop (``max-bandwidth``
  unlimited, ``downtime-limit`` 1 ms: QEMU goes on iterating);
- ``unheld``: no hold at all (unlimited from the start), then as ``shipped``;
- ``stopped``: QEMU's own ``migrate`` of the VM after ``stop`` (one pass over RAM);
- ``running``: QEMU's own ``migrate`` with the VM left running (no pause-vm at all),
  cut off 3 s after the unplug (a busy guest never converges): RAM bytes sent by then.
Printed (medians): stream bytes and their ratio to ``stopped``, and the RAM bytes QEMU
sent while the VM still ran.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import trio  # noqa: E402
from failover_guest import failover_vm  # noqa: E402
from qemuvm import find_qemus  # noqa: E402

import vmtransport  # noqa: E402
from vmtransport import _orchestration  # noqa: E402

UNPLUG = 1.0


def one(qemu: str, tmp: Path, mem: int, kind: str, dirtier: str, accel: str) -> dict[str, float]:
    with failover_vm(qemu, tmp, mem_mib=mem, bios="dirty", accel=accel) as fo:
        fo.guest.arm_cpu_dirtier(1 << 20, mem << 20)
        fo.guest.negotiate()
        fo.plug_primary()
        fo.vm.cmd("cont")
        time.sleep(0.3)

        def guest() -> None:
            fo.vm.qmp.wait_event("UNPLUG_PRIMARY", timeout=30)
            if dirtier == "qemu" and kind != "stopped":  # a stopped guest writes nothing
                fo.guest.dirty(1 << 20, (mem - 1) << 20)
            time.sleep(UNPLUG)
            fo.eject()
            if dirtier == "qemu" and kind != "stopped":
                fo.vm.qmp.wait_event("MIGRATION", timeout=30, match={"status": "active"})
                fo.guest.stop_dirty()

        if kind in ("stopped", "running"):
            limits = {"max-bandwidth": _orchestration.UNLIMITED_BANDWIDTH, "downtime-limit": 1}
            fo.vm.cmd("migrate-set-parameters", limits)
            if kind == "stopped":
                fo.vm.cmd("stop")
            out = tmp / "stream"
            fo.vm.migrate(f"exec:cat > {out}")
            guest()  # this thread: the harness's QMP client is not thread-safe
            sent = None
            if kind == "running":  # a busy guest never converges: cut off after 3 s
                deadline = time.monotonic() + 3
                info = fo.vm.query_migrate()
                while (info["status"] in ("setup", "wait-unplug", "active")
                       and time.monotonic() < deadline):  # fmt: skip
                    time.sleep(0.1)
                    info = fo.vm.query_migrate()
                sent = info["ram"]["transferred"]  # RAM bytes (the stream has a little more)
                with suppress(Exception):
                    fo.vm.cmd("migrate_cancel")
            fo.vm.wait_migration(timeout=300)
            return {"bytes": sent or out.stat().st_size, "sent_running": float("nan"),
                    "passes": fo.guest.cpu_dirtier_passes()}  # fmt: skip
        saved = _orchestration.HOLD_BANDWIDTH_MIN, _orchestration.AFTER_STOP
        unlimited = _orchestration.UNLIMITED_BANDWIDTH
        if kind == "lifted":
            _orchestration.AFTER_STOP = {"max-bandwidth": unlimited}  # type: ignore[misc]
        if kind == "unheld":
            _orchestration.HOLD_BANDWIDTH_MIN = unlimited  # type: ignore[misc]  # no hold
        t = threading.Thread(target=guest)
        t.start()
        try:
            result = trio.run(
                lambda: vmtransport.save_vm(fo.sock, f"file:{tmp / 'a.sav'}", pause_vm=True)
            )
        finally:
            _orchestration.HOLD_BANDWIDTH_MIN, _orchestration.AFTER_STOP = saved  # type: ignore[misc]
            t.join()
        return {"bytes": result.bytes, "sent_running": float(result.sent_running or 0),
                "passes": fo.guest.cpu_dirtier_passes()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mem-mib", type=int, default=256)
    ap.add_argument("--dirtier", choices=("vcpu", "qemu"), default="vcpu")
    ap.add_argument("--accel", choices=("tcg", "kvm"), default="tcg")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--qemu", default="7.2,10.0")
    args = ap.parse_args()
    qemus = find_qemus()
    kinds = ["shipped", "lifted", "unheld", "stopped", "running"]
    for version in args.qemu.split(","):
        rows: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
        for r in range(args.rounds):
            order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]
            for kind in order:
                with TemporaryDirectory(dir="/var/tmp") as d:
                    row = one(qemus[version], Path(d), args.mem_mib, kind, args.dirtier, args.accel)
                    rows[kind].append(row)
        base = statistics.median(x["bytes"] for x in rows["stopped"])
        print(f"QEMU {version}, {args.mem_mib} MiB busy guest ({args.accel}), "
              f"dirtier {args.dirtier}, {args.rounds} rounds (medians)")
        print(f"{'save':10} {'stream MiB':>11} {'/ stopped':>10} {'RAM sent running':>17}"
              f" {'dirtier passes':>15}")
        for kind in kinds:
            b = statistics.median(x["bytes"] for x in rows[kind])
            s = statistics.median(x["sent_running"] for x in rows[kind])
            sent = "-" if s != s else f"{s / 1024:.0f} KiB"
            p = statistics.median(x["passes"] for x in rows[kind])
            print(f"{kind:10} {b / 2**20:11.1f} {b / base:10.4f} {sent:>17} {p:15.0f}")


if __name__ == "__main__":
    main()
