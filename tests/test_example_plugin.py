"""plugins/vmtransport-example, the minimal plugin the guide tells readers to copy: it
passes the conformance suite, and saves and restores a stream through the command line
once installed (its entry point), as a third party's would."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers import VMT

from vmtransport import Registry
from vmtransport.testing import CHECKS, PathFactory, SyntheticStream, run_check

PLUGIN = Path(__file__).resolve().parent.parent / "plugins" / "vmtransport-example"


def load_plugin() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "vmtransport_example", PLUGIN / "vmtransport_example.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("check", CHECKS)
def test_conformance(check: str, tmp_path: Path) -> None:
    registry = Registry(entry_points=False, extra=(load_plugin(),), strict=True)
    run_check(check, PathFactory("example:{path}", registry=registry), tmp_path)


def test_installed_through_its_entry_point(tmp_path: Path) -> None:
    """Installed with pip into a directory of its own (``--no-deps``: vmtransport is
    the one under test), found through its entry point by the real command."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
         "--target", str(site), str(PLUGIN)],
        check=True, capture_output=True,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(site)}
    listed = subprocess.run([str(VMT), "plugins"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.startswith("example:"))
    assert "entry point example (vmtransport-example 1.0)" in line
    stream = bytes(SyntheticStream(2000, seed=3))
    image = tmp_path / "vm.sav"
    saved = subprocess.run(
        [str(VMT), "save", f"example:{image}"], env=env, input=stream, capture_output=True
    )
    assert saved.returncode == 0, saved.stderr
    assert oct(image.stat().st_mode & 0o777) == "0o600"
    restored = subprocess.run(
        [str(VMT), "restore", f"example:{image}"], env=env, capture_output=True
    )
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout == stream
