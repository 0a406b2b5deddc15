"""docs/reliability.md, the fault matrix, is what the suite's fault markers say: current,
complete in its keywords, and covering every fault issue 11 lists."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import reliability  # noqa: E402  (scripts/ is no package)

LIBVIRT_FIELDS = ("magic", "version", "XML length", "was_running", "format", "cookieOffset",
                  "unused", "payload")  # fmt: skip
#: The faults issue 11 lists, each as (direction, pattern its fault name matches, how
#: many distinct rows at least).
REQUIRED: list[tuple[str, str, int]] = [
    ("save", r"^helper SIGKILL mid-save", 1),
    ("save", r"^helper SIGTERM mid-save", 1),
    ("restore", r"^helper SIGKILL mid-restore", 1),
    ("restore", r"^helper SIGTERM mid-restore", 1),
    ("save", r"^QEMU killed mid-save", 1),
    ("save", r"^disk full", 3),  # at several points
    ("save", r"O_DIRECT refused", 1),
    ("save", r"^medium vanishes mid-save", 1),
    ("restore", r"^medium vanishes mid-restore", 1),
    ("save", r"^stream truncated at every section boundary", 1),
    ("restore", r"^image truncated", 1),
    ("restore", r"flipped.*structural|structural.*flipped", 1),
    ("save", r"^two streams concatenated", 1),
    ("save", r"^two streams interleaved", 1),
    *[
        ("restore", rf"^libvirt image: {re.escape(field)}\b", 1)
        for field in LIBVIRT_FIELDS
    ],
]


@pytest.fixture(scope="module")
def marked() -> list[reliability.Marked]:
    return reliability.collect(ROOT)


def test_every_marker_names_its_promise(marked: list[reliability.Marked]) -> None:
    problems = [p for m in marked for p in m.problems()]
    assert problems == [], "\n".join(problems)


def test_the_matrix_is_current(marked: list[reliability.Marked]) -> None:
    doc = ROOT / "docs" / "reliability.md"
    if not doc.exists() or doc.read_text() != reliability.render(marked):
        pytest.fail("docs/reliability.md is stale: run scripts/reliability.py", pytrace=False)


@pytest.mark.parametrize(("direction", "pattern", "rows"), REQUIRED)
def test_the_matrix_covers_the_issue(
    marked: list[reliability.Marked], direction: str, pattern: str, rows: int
) -> None:
    found = {
        m.promise
        for m in marked
        if m.kwargs.get("direction") == direction and re.search(pattern, m.args[0])
    }
    assert len(found) >= rows, f"{direction}: {pattern!r} has {len(found)} rows, needs {rows}"


def test_a_direction_gets_its_section_once_a_test_carries_it() -> None:
    """The hook for issue 12's QMP section: no section without a row, one with."""
    qmp = reliability.Marked(
        "tests/test_qmp.py::test_garbage[x]", ("monitor talks garbage",),
        {"direction": "qmp", "vm": "v", "disk": "d", "exit": "1", "message": "m"}, None,
    )  # fmt: skip
    title = f"## {reliability.DIRECTIONS['qmp']}"
    assert title not in reliability.render([])
    text = reliability.render([qmp])
    assert title in text
    row = "| monitor talks garbage | v | d | 1 | m | `tests/test_qmp.py::test_garbage` `[x]` |"
    assert row in text
    bad = reliability.Marked("t.py::t", ("f",), {"direction": "qmp", "vm": ""}, None)
    with pytest.raises(ValueError, match=r"t.py::t: fault marker: vm= must be a non-empty"):
        reliability.render([bad])
