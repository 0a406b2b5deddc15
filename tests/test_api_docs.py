"""docs/api.md's examples run as they stand, against real QEMU 7.2 and 10.0: the QMP
client, ``save_vm`` of a source VM, ``restore_vm`` into two destinations started with
``-incoming defer``, whose RAM then equals the source's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import parse_header
from qemuvm import describe_difference, files_equal
from qmp_vms import destination, source_vm

pytestmark = pytest.mark.qemu
DOC = Path(__file__).parent.parent / "docs" / "api.md"


def run(block: str, replace: dict[str, str]) -> None:
    for old, new in replace.items():
        block = block.replace(old, new)
    exec(compile(block, str(DOC), "exec"), {"__name__": "docs"})


def test_api_examples_run(
    qemu: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 4
    client, save, restore, restore_client = blocks
    image = tmp_path / "a.sav"
    with source_vm(qemu, tmp_path, paused=False) as (vm, sock):
        paths = {"/run/vm/qmp.sock": sock, "/var/lib/vm/a.sav": str(image)}
        run(client, paths)  # it stops the VM
        run(save, paths)
        assert vm.wait_exit(timeout=30) == 0  # after="quit"
        src_ram = vm.ram_file
    with open(image, "rb") as f:
        assert parse_header(f.read(65536)).metadata["vm"]["runstate"] == "paused"
    capsys.readouterr()
    for block, expected in [(restore, "paused"), (restore_client, "running")]:
        with destination(qemu, tmp_path) as (dst, dsock):
            run(block, {"/run/vm2/qmp.sock": dsock, "/var/lib/vm/a.sav": str(image)})
            assert dst.status() == expected
            assert files_equal(src_ram, dst.ram_file), describe_difference(src_ram, dst.ram_file)
        out = capsys.readouterr().out.splitlines()
        if block is restore:
            assert out[1] == "paused vm paused", out
        else:
            assert out[-1] == "running running", out
            assert out[-2].startswith("Event(name='RESUME'"), out
            assert "complete" in out and out[0] == "started", out
            assert re.fullmatch(r"\d+ MiB, \d+ MiB/s", out[1]), out
