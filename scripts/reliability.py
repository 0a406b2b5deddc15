#!/usr/bin/env python3
"""Render docs/reliability.md, the fault matrix, from the test suite's fault markers.

    .venv/bin/python scripts/reliability.py           # rewrite docs/reliability.md
    .venv/bin/python scripts/reliability.py --check   # exit 1 if it is stale

A test that injects a fault or bad input carries
``@pytest.mark.fault("what", direction=..., vm=..., disk=..., exit=..., message=...)``.
The rows come from pytest's own collection (``pytest --collect-only`` with this module
loaded as a plugin), not from reading the sources: a row exists only while pytest
collects its test. tests/test_reliability.py fails when the file is stale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
DUMP_ENV = "VMTRANSPORT_RELIABILITY_DUMP"
KEYWORDS = ("direction", "vm", "disk", "exit", "message")
#: Section titles, in the order they appear; a direction with no rows has no section.
DIRECTIONS = {
    "save": "Save: QEMU's stream into a target",
    "restore": "Restore: an image or stream back to QEMU",
    "copy": "Copy: from one URI to another",
    "inspect/verify": "Inspect and verify",
    "cli": "The command line: arguments, URIs, descriptors",
    # Issue 12: the QMP client, save --qmp, restore --qmp.
    "qmp": "QMP: hostile peers, save --qmp and restore --qmp",
}
MAX_LISTED = 4  # parametrizations listed by id; more are counted


@dataclass(frozen=True, order=True)
class Promise:
    """One row: the fault as the matrix names it and what its tests assert."""

    direction: str
    fault: str
    vm: str
    disk: str
    exit: str
    message: str


@dataclass(frozen=True)
class Marked:
    """A collected test item and one of its fault markers."""

    nodeid: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    xfail: str | None  #: the xfail reason: a promise not kept today

    @property
    def function(self) -> str:
        return self.nodeid.partition("[")[0]

    @property
    def param(self) -> str | None:
        _, bracket, rest = self.nodeid.partition("[")
        return rest[:-1] if bracket else None

    def problems(self) -> list[str]:
        """What is wrong with the marker; [] if it makes a row."""
        out = []
        if len(self.args) != 1 or not isinstance(self.args[0], str) or not self.args[0].strip():
            out.append("one positional argument, the fault's name, is required")
        for key in KEYWORDS:
            value = self.kwargs.get(key)
            if not isinstance(value, str) or not value.strip():
                out.append(f"{key}= must be a non-empty string")
            elif "\n" in value:
                out.append(f"{key}= must be one line")
        unknown = sorted(set(self.kwargs) - set(KEYWORDS))
        if unknown:
            out.append(f"unknown keywords {unknown}")
        if self.kwargs.get("direction") not in DIRECTIONS:
            out.append(f"direction= must be one of {list(DIRECTIONS)}")
        return [f"{self.nodeid}: fault marker: {p}" for p in out]

    @property
    def promise(self) -> Promise:
        return Promise(fault=self.args[0], **{k: self.kwargs[k] for k in KEYWORDS})


# --- collection: this module is also the pytest plugin ------------------------------------


def pytest_collection_finish(session: Any) -> None:
    """Dump every collected item's fault markers (only when asked to, by collect())."""
    path = os.environ.get(DUMP_ENV)
    if not path:
        return
    out = []
    for item in session.items:
        xfail = item.get_closest_marker("xfail")
        reason = str(xfail.kwargs.get("reason", "")) or "xfail" if xfail else None
        for mark in item.iter_markers(name="fault"):
            out.append(
                {"nodeid": item.nodeid, "args": list(mark.args), "kwargs": mark.kwargs,
                 "xfail": reason}
            )  # fmt: skip
    Path(path).write_text(json.dumps(out))


class CollectionError(Exception):
    """pytest could not collect the suite."""


def collect(root: Path = ROOT) -> list[Marked]:
    """The fault markers of every test pytest collects under ``root``/tests."""
    with tempfile.TemporaryDirectory() as d:
        dump = Path(d) / "faults.json"
        env = dict(os.environ)
        env[DUMP_ENV] = str(dump)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parent), *filter(None, [env.get("PYTHONPATH")])]
        )
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
             "-p", "reliability", "tests"],
            cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if r.returncode != 0 or not dump.exists():
            raise CollectionError(
                f"reliability: pytest could not collect the suite (exit {r.returncode}):\n"
                + r.stdout[-3000:] + r.stderr[-3000:]
            )
        raw = json.loads(dump.read_text())
    return [Marked(m["nodeid"], tuple(m["args"]), m["kwargs"], m["xfail"]) for m in raw]


# --- rendering -------------------------------------------------------------------------------


INTRO = """\
# Reliability: the fault matrix

<!-- Generated by scripts/reliability.py from the test suite: do not edit by hand. -->

What vmtransport promises when things go wrong, fault by fault, and the test that checks
each promise. Every row is a fault or a bad input that a test of the suite injects into
the real thing (QEMU 7.2 and 10.0, files, pipes, sockets, mounts, signals), and says what
that test asserts, no more:

- **VM**: what becomes of the source VM (save) or the destination VM (restore);
- **on disk**: what is left under the final name and beside it;
- **exit**: the exit status of `vmtransport`, or what an in-process call raises;
- **message**: what the one-line `vmtransport: error: ...` message says.

The promises behind them (`docs/semantics.md`): a save never exits 0 unless the whole
stream reached its target and never leaves a partial image under the final name; a
damaged or incomplete image never becomes a running VM; every error is one line naming
the input and the reason, exit 1 for I/O and stream errors, 2 for usage and URI errors.

A row marked **xfail** is a promise the code does not keep today: its test is marked
`xfail(strict=True)` and fails the suite the day the bug is fixed, so that the mark (and
this note) go.

## How this file is made

A test that injects a fault carries a marker, for example

```python
@pytest.mark.fault("helper SIGKILL mid-save", direction="save",
                   vm="source VM usable: migration failed", disk="no file under the final name",
                   exit="QEMU: migration failed", message="none (killed)")
```

`scripts/reliability.py` collects the suite (`pytest --collect-only` with the script as a
plugin: a row exists only while pytest collects its test) and writes this file; tests
with the same fault and promise share a row, their parametrizations folded.
`tests/test_reliability.py` fails when the file is stale, when a marker lacks a keyword,
and when a fault that issue 11 lists has no row. To regenerate:

```sh
.venv/bin/python scripts/reliability.py
```

Directions: `save`, `restore`, `copy`, `inspect/verify`, `cli`, and `qmp` (issue 12:
hostile QMP peers, `save --qmp` and `restore --qmp`).
"""


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def fold(items: list[Marked]) -> str:
    """The node ids of a row's tests, one per function, parametrizations folded."""
    by_function: dict[str, list[Marked]] = {}
    for m in items:
        by_function.setdefault(m.function, []).append(m)
    parts = []
    for function, marked in by_function.items():
        params = [m.param for m in marked if m.param is not None]
        text = f"`{function}`"
        if len(params) > MAX_LISTED:
            text += f" ({len(params)} cases)"
        elif params:
            text += " `[" + ", ".join(params) + "]`"
        reasons = sorted({m.xfail for m in marked if m.xfail})
        if reasons:
            text += " **xfail: " + "; ".join(reasons) + "**"
        parts.append(cell(text))
    return "<br>".join(parts)


def order(p: Promise) -> tuple[str, Promise]:
    """Rows by fault name, whatever its case ("QEMU killed" beside "qemu ...")."""
    return p.fault.casefold(), p


def render(marked: Iterable[Marked]) -> str:
    items = list(marked)
    problems = [p for m in items for p in m.problems()]
    if problems:
        raise ValueError("\n".join(problems))
    rows: dict[Promise, list[Marked]] = {}
    for m in items:
        rows.setdefault(m.promise, []).append(m)
    out = [INTRO]
    total = 0
    for direction, title in DIRECTIONS.items():
        promises = sorted((p for p in rows if p.direction == direction), key=order)
        if not promises:
            continue
        out.append(f"\n## {title}\n")
        out.append("| fault | VM | on disk | exit | message | test(s) |")
        out.append("|---|---|---|---|---|---|")
        for p in promises:
            fields = (p.fault, p.vm, p.disk, p.exit, p.message)
            out.append("| " + " | ".join(cell(f) for f in fields) + f" | {fold(rows[p])} |")
        total += len(promises)
    tests = len({m.nodeid for m in items})
    out.append(f"\n{total} rows from {tests} marked test items.\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = ap.parse_args(argv)
    try:
        text = render(collect())
    except (CollectionError, ValueError) as exc:
        print(f"reliability: {exc}", file=sys.stderr)
        return 1
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print("reliability: docs/reliability.md is stale: run scripts/reliability.py",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    DOC.write_text(text)
    print(f"reliability: wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
