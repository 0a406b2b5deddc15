"""Shared fixtures: the real QEMUs (7.2 and 10.0), the vmtransport command and the
session's save of a real VM (tests/helpers.py has the plain helpers).

Missing QEMUs make the tests that need them fail, never skip: CI must run them all.
scripts/setup.sh installs both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import Saved, save_vm
from qemuvm import find_qemus, kvm_usable, qemu_version

# Versions every test that takes the `qemu` fixture runs against, with their test ids.
QEMU_VERSIONS = ("7.2", "10.0")


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    found = find_qemus()
    for version in QEMU_VERSIONS:
        cmd = found.get(version)
        try:
            reported = qemu_version(cmd) if cmd else "MISSING (run scripts/setup.sh)"
        except Exception as e:  # a header must not break the run
            reported = f"broken: {e}"
        lines.append(f"qemu{version}: {cmd or '-'} -> {reported}")
    lines.append(f"accelerator: {'kvm' if kvm_usable() else 'tcg (no usable /dev/kvm)'}")
    return lines


@pytest.fixture(scope="session")
def qemu_cmds() -> dict[str, str]:
    """{"7.2": cmd, "10.0": cmd}; fails (does not skip) when one is missing or wrong."""
    found = find_qemus()
    missing = [v for v in QEMU_VERSIONS if v not in found]
    if missing:
        pytest.fail(
            f"QEMU {' and '.join(missing)} not found: run scripts/setup.sh "
            "(it installs QEMU 7.2 and unpacks 10.0 under $VMTRANSPORT_CACHE, "
            "default /var/cache/vmtransport)",
            pytrace=False,
        )
    for version, cmd in found.items():
        actual = qemu_version(cmd)
        if not actual.startswith(version + "."):
            pytest.fail(f"{cmd} is QEMU {actual}, expected {version}.x", pytrace=False)
    return found


@pytest.fixture(params=QEMU_VERSIONS, ids=[f"qemu{v}" for v in QEMU_VERSIONS])
def qemu(request: pytest.FixtureRequest, qemu_cmds: dict[str, str]) -> str:
    """The command of one QEMU version; tests using it run once per version."""
    version: str = request.param
    return qemu_cmds[version]


@pytest.fixture(scope="session")
def vmtransport_cmd() -> Path:
    """The `vmtransport` console script of the venv running the tests."""
    path = Path(sys.executable).parent / "vmtransport"
    if not path.exists():
        pytest.fail(
            f"{path} not found: install the package (scripts/setup.sh does "
            "pip install -e '.[test,lint]' into .venv)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def saves() -> dict[str, Saved]:
    """The session's saves of real VMs by QEMU version, made on first use."""
    return {}


@pytest.fixture
def saved(
    qemu: str,
    qemu_cmds: dict[str, str],
    saves: dict[str, Saved],
    tmp_path_factory: pytest.TempPathFactory,
) -> Saved:
    """A fresh VM of the ``qemu`` under test, saved once per session (see
    :class:`helpers.Saved`); tests must not change its files."""
    version = next(v for v, cmd in qemu_cmds.items() if cmd == qemu)
    if version not in saves:
        saves[version] = save_vm(version, qemu, tmp_path_factory)
    return saves[version]
