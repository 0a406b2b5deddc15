"""Tests of the QEMU harness (tests/qemuvm.py) itself, against each real QEMU.

They use QEMU's own exec: and fd: transports only, no vmtransport code.
"""

from __future__ import annotations

import os
import shlex
import threading
from pathlib import Path

import pytest
from qemuvm import (
    QMP,
    VM,
    QMPError,
    VMError,
    describe_difference,
    files_equal,
    first_difference,
    make_ram_file,
)

pytestmark = pytest.mark.qemu

MEM_MIB = 64
TIMEOUT = 60.0
QEVM_HEADER = bytes.fromhex("5145564d00000003")


def q(path: Path) -> str:
    return shlex.quote(str(path))


def test_ram_file_helpers(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_ram_file(a, 40)  # more than one 16 MiB chunk, and a partial one
    make_ram_file(b, 40, random=False)
    assert a.stat().st_size == b.stat().st_size == 40 << 20
    assert b.stat().st_blocks == 0  # sparse
    data = a.read_bytes()
    pages = {data[i : i + 4096] for i in range(0, len(data), 4096)}
    assert len(pages) == len(data) // 4096, "random RAM pages must all differ"
    assert not files_equal(a, b)
    assert first_difference(a, b) == 0
    b.write_bytes(data)
    assert files_equal(a, b)
    assert first_difference(a, b) is None
    with open(b, "r+b") as f:
        f.seek(12345)
        f.write(bytes([data[12345] ^ 1]))
    assert first_difference(a, b) == 12345
    assert "page 3" in describe_difference(a, b)
    b.write_bytes(data[:100])
    assert first_difference(a, b) == 100
    assert not files_equal(a, b)


def test_migrate_to_file_and_restore(qemu: str, tmp_path: Path) -> None:
    src_ram, dst_ram = tmp_path / "src.ram", tmp_path / "dst.ram"
    stream = tmp_path / "stream"
    make_ram_file(src_ram, MEM_MIB)
    make_ram_file(dst_ram, MEM_MIB, random=False)

    with VM(qemu, tmp_path, name="src", mem_mib=MEM_MIB, ram_file=src_ram, paused=True) as src:
        assert src.status() == "prelaunch"
        src.migrate(f"exec:cat > {q(stream)}")
        info = src.wait_migration(TIMEOUT)
        assert info["status"] == "completed", info
        assert info["ram"]["total"] >= MEM_MIB << 20
        assert src.status() == "postmigrate"
        # The events capability is on: MIGRATION events were collected meanwhile.
        src.qmp.wait_event("MIGRATION", 5, match={"status": "completed"})

    with open(stream, "rb") as f:
        assert f.read(len(QEVM_HEADER)) == QEVM_HEADER
    assert stream.stat().st_size > MEM_MIB << 20

    with VM(
        qemu,
        tmp_path,
        name="dst",
        mem_mib=MEM_MIB,
        ram_file=dst_ram,
        incoming=f"exec:cat {q(stream)}",
    ) as dst:
        status = dst.wait_incoming(TIMEOUT)
        # The source was never started (-S): its "prelaunch" travels in the stream.
        assert status in ("prelaunch", "paused")
        assert dst.query_migrate()["status"] == "completed"
        assert dst.returncode is None

    assert files_equal(src_ram, dst_ram), describe_difference(src_ram, dst_ram)


@pytest.mark.parametrize("uri", ["exec:exit 1", "exec:false"])
def test_failed_migration_leaves_source_usable(qemu: str, tmp_path: Path, uri: str) -> None:
    ram = tmp_path / "src.ram"
    make_ram_file(ram, MEM_MIB)
    stream = tmp_path / "stream"
    with VM(qemu, tmp_path, name="src", mem_mib=MEM_MIB, ram_file=ram, paused=True) as src:
        src.migrate(uri)
        info = src.wait_migration(TIMEOUT)
        assert info["status"] == "failed", info
        assert src.status() == "prelaunch"
        # Still usable: a second migration succeeds.
        src.migrate(f"exec:cat > {q(stream)}")
        assert src.wait_migration(TIMEOUT)["status"] == "completed"
        assert src.status() == "postmigrate"
    assert stream.read_bytes()[: len(QEVM_HEADER)] == QEVM_HEADER


def test_migrate_to_fd_passed_over_qmp(qemu: str, tmp_path: Path) -> None:
    """send_fd (getfd + SCM_RIGHTS) and an fd: migration into a pipe read here."""
    received = bytearray()
    r, w = os.pipe()

    def drain() -> None:
        with open(r, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        with VM(qemu, tmp_path, name="src", mem_mib=MEM_MIB, paused=True) as src:
            src.qmp.send_fd(w, "migfd")
            os.close(w)
            w = -1
            src.migrate("fd:migfd")
            info = src.wait_migration(TIMEOUT)
            assert info["status"] == "completed", info
    finally:
        if w >= 0:
            os.close(w)
        reader.join(TIMEOUT)
    assert not reader.is_alive()
    assert received[: len(QEVM_HEADER)] == QEVM_HEADER
    # Zero RAM: pages go as ZERO flags, so the stream is much smaller than RAM.
    assert len(received) < MEM_MIB << 20


def test_qmp_errors_and_events(qemu: str, tmp_path: Path) -> None:
    with VM(qemu, tmp_path, mem_mib=MEM_MIB, paused=True) as vm:
        with pytest.raises(QMPError) as excinfo:
            vm.qmp.cmd("no-such-command")
        assert excinfo.value.error_class == "CommandNotFound"
        with pytest.raises(QMPError):
            vm.cmd("migrate-set-parameters", max_bandwidth="fast")
        # Keyword arguments: underscores become dashes.
        vm.cmd("migrate-set-parameters", max_bandwidth=123 << 20)
        assert vm.cmd("query-migrate-parameters")["max-bandwidth"] == 123 << 20
        vm.cmd("cont")
        assert vm.qmp.wait_event("RESUME", 10)["event"] == "RESUME"
        assert vm.status() == "running"
        vm.cmd("stop")
        vm.qmp.wait_event("STOP", 10)
        assert vm.status() == "paused"
        with pytest.raises(TimeoutError):
            vm.qmp.wait_event("NO_SUCH_EVENT", 0.2)
        assert vm.pid > 0
    assert vm.returncode == 0, vm.log()  # quit


def test_vm_that_cannot_start_reports_its_log(qemu: str, tmp_path: Path) -> None:
    with pytest.raises(VMError, match="no-such-option"):
        with VM(qemu, tmp_path, extra_args=["-no-such-option"], start_timeout=TIMEOUT):
            pass


def test_failed_incoming_reports_exit_status(qemu: str, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a migration stream" * 100)
    vm = VM(qemu, tmp_path, mem_mib=MEM_MIB, incoming=f"exec:cat {q(garbage)}")
    # QEMU may even exit before QMP is up: then start() raises.
    with pytest.raises(VMError, match="exit status 1"), vm:
        vm.wait_incoming(TIMEOUT)
    assert vm.returncode == 1


def test_qmp_connect_times_out_without_server(tmp_path: Path) -> None:
    with QMP(tmp_path / "nobody.sock") as qmp, pytest.raises(TimeoutError):
        qmp.connect(timeout=0.2)
