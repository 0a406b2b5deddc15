"""``--progress`` and ``--events json`` (docs/events.md): against real QEMU 7.2 and 10.0
for ``save --qmp``, on real pipes and pseudo-terminals for the bar, and with QEMU running
the ``exec:`` helpers, which print nothing unless asked.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import MEM_MIB, VMT, load
from qemuvm import VM, make_ram_file
from test_qmp_save import BIG_MIB, source_vm, wait_active

from vmtransport._progress import BarRenderer, Reporter, bar_line
from vmtransport.testing import SyntheticStream

TIMEOUT = 120
#: the promise: a progress event at least this often
PERIOD = 0.5
#: scheduling slack of this (shared, 2-core) machine for times measured by the reader
SLACK = 0.3


def slow_copy(path: Path | str, rate_mib: int = 64) -> str:
    """A command copying stdin to ``path`` at about ``rate_mib`` MiB/s (one line: it
    ends up in error messages)."""
    code = (
        "import sys, time; out = open(sys.argv[1], 'wb'); "
        f"[(out.write(b), time.sleep(1 / {rate_mib})) "
        "for b in iter(lambda: sys.stdin.buffer.read(1 << 20), b'')]"
    )
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} {shlex.quote(str(path))}"


def slow_sink(path: Path, rate_mib: int = 64) -> str:
    """An ``exec:`` target that takes the stream at about ``rate_mib`` MiB/s: a save of
    256 MiB then lasts a few seconds, QEMU held back by the full pipe."""
    return f"exec:{slow_copy(path, rate_mib)}"


def image_payload(path: Path) -> int:
    """The stream bytes of a complete image, as ``vmtransport inspect`` reads them."""
    out = subprocess.run(
        [str(VMT), "inspect", "--json", str(path)], capture_output=True, check=True
    ).stdout
    doc = json.loads(out)
    assert doc["complete"] and doc["stream"]["complete"], doc["problems"]
    if doc["image"] is not None:
        assert doc["image"]["checksum_ok"]
        assert doc["image"]["payload_length"] == doc["stream"]["length"]
    length: int = doc["stream"]["length"]
    return length


def read_lines(proc: subprocess.Popen[bytes]) -> list[tuple[float, bytes]]:
    """Every line of ``proc``'s stderr with the time it arrived."""
    assert proc.stderr is not None
    lines = []
    deadline = time.monotonic() + TIMEOUT
    while line := proc.stderr.readline():
        lines.append((time.monotonic(), line))
        assert time.monotonic() < deadline
    proc.wait(timeout=TIMEOUT)
    return lines


def states(events: list[dict[str, Any]], source: str) -> list[str]:
    return [e["state"] for e in events if e["event"] == "state" and e["source"] == source]


def check_envelope(events: list[dict[str, Any]]) -> None:
    """Every event: schema version 1, a time that never goes back."""
    ts = [e["t"] for e in events]
    assert all(e["v"] == 1 for e in events)
    assert ts == sorted(ts) and ts[0] >= 0


def check_progress_period(events: list[dict[str, Any]], arrived: list[float]) -> None:
    """A progress event at least every PERIOD seconds from start to the end, by the
    events' own clock and by the reader's."""
    marks = [i for i, e in enumerate(events) if e["event"] in ("start", "progress")]
    end = len(events) - 1
    assert events[end]["event"] in ("result", "error")
    for a, b in zip([*marks], [*marks[1:], end], strict=True):
        assert events[b]["t"] - events[a]["t"] <= PERIOD, (events[a], events[b])
        assert arrived[b] - arrived[a] <= PERIOD + SLACK, (events[a], events[b])


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_events_json_qmp_save(qemu: str, tmp_path: Path, paused: bool) -> None:
    image = tmp_path / "x.img"
    with source_vm(qemu, tmp_path, paused=paused, mem_mib=BIG_MIB) as (vm, sock):
        before = vm.status()
        cmd = [str(VMT), "save", "--qmp", sock, slow_sink(image), "--events", "json"]
        with subprocess.Popen(cmd, stderr=subprocess.PIPE) as proc:
            lines = read_lines(proc)
        assert proc.returncode == 0, lines
        final = vm.status()
    events = [json.loads(line) for _, line in lines]  # parseable, every line
    assert all(isinstance(e, dict) for e in events)
    check_envelope(events)
    start, result = events[0], events[-1]
    assert start["event"] == "start" and start["operation"] == "save"
    assert start["monitor"] == sock and start["uri"] == slow_sink(image)
    assert [e["event"] for e in events].count("result") == 1
    # States, in order, each source on its own.
    qemu_states = states(events, "qemu")
    assert qemu_states[0] == "setup" and qemu_states[-1] == "completed", qemu_states
    assert set(qemu_states) <= {"setup", "active", "device", "completed"}, qemu_states
    assert "active" in qemu_states
    assert states(events, "pipeline") == ["started", "eof", "committing", "complete"]
    expected_vm = ["prelaunch", "postmigrate"] if paused else ["running", "paused", "postmigrate"]
    assert states(events, "vm") == expected_vm
    assert final == "postmigrate" and before == expected_vm[0]
    # Progress at least every 0.5 s over a save of several seconds.
    check_progress_period(events, [t for t, _ in lines])
    progress = [e for e in events if e["event"] == "progress"]
    assert result["seconds"] >= 2 and len(progress) >= 4
    figures = [p["bytes"] for p in progress]
    assert figures == sorted(figures)
    assert any(0 < p["bytes"] < figures[-1] for p in progress)  # seen mid-way
    # The total is query-migrate's RAM total (every RAM block: a little over -m).
    ram_total = progress[-1]["qemu"]["ram_total"]
    assert all(p["total"] == ram_total for p in progress[-3:])
    assert BIG_MIB << 20 <= ram_total < (BIG_MIB + 16) << 20
    assert any(p["eta"] is not None and p["eta"] > 0 for p in progress)
    assert all(0 <= p["fraction"] <= 1 for p in progress if p["fraction"] is not None)
    assert progress[-1]["fraction"] == 1.0 and progress[-1]["bytes"] == result["bytes"]
    assert any(p.get("qemu", {}).get("status") == "active" for p in progress)
    # The result's figures are the image's.
    assert result == {
        "v": 1,
        "t": result["t"],
        "event": "result",
        "ok": True,
        "bytes": image_payload(image),
        "seconds": result["seconds"],
        "rate": pytest.approx(result["bytes"] / result["seconds"]),
        "uri": slow_sink(image),
        "path": None,  # an exec: target has no file of its own
        "vm_state": "postmigrate",
        "after": "pause",
    }
    assert result["bytes"] > BIG_MIB << 20


def test_events_json_qmp_save_to_a_file(qemu: str, tmp_path: Path) -> None:
    """A file target: the result names the image's path; --after resume shows in the VM
    states and the result."""
    image = tmp_path / "x.img"
    with source_vm(qemu, tmp_path, paused=False) as (vm, sock):
        cmd = [str(VMT), "save", "--qmp", sock, f"file:{image}", "--events=json"]
        cmd += ["--after", "resume", "--progress"]  # JSON wins over an explicit bar
        result = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, check=False)
        assert result.returncode == 0, result.stderr
        assert vm.status() == "running"
    events = [json.loads(line) for line in result.stderr.splitlines()]
    check_envelope(events)
    assert states(events, "vm") == ["running", "paused", "postmigrate", "running"]
    last = events[-1]
    assert last["event"] == "result" and last["path"] == str(image)
    assert last["bytes"] == image_payload(image) and last["vm_state"] == "running"
    assert last["after"] == "resume"


def test_events_json_error_on_a_failing_save(qemu: str, tmp_path: Path) -> None:
    with source_vm(qemu, tmp_path, paused=False, mem_mib=BIG_MIB) as (vm, sock):
        target = "exec:head -c 1000000 >/dev/null; echo disk on fire >&2; exit 3"
        cmd = [str(VMT), "save", "--qmp", sock, target, "--events", "json"]
        result = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, check=False)
        assert result.returncode == 1
        assert vm.status() == "running"
    # Every line is JSON, even the target's own stderr (an output event).
    events = [json.loads(line) for line in result.stderr.splitlines()]
    check_envelope(events)
    assert [e["text"] for e in events if e["event"] == "output"] == ["disk on fire"]
    error = events[-1]
    assert [e["event"] for e in events].count("error") == 1
    assert "result" not in [e["event"] for e in events]
    left = "the VM is running, its migration settings as they were"
    assert error == {
        "v": 1,
        "t": error["t"],
        "event": "error",
        "ok": False,
        "message": error["message"],
        "vm": left,
        "vm_state": "running",
        "exit": 1,
    }
    assert "exited with status 3" in error["message"] and error["message"].endswith(f"({left})")
    assert states(events, "pipeline")[-1] in ("failed", "cancelled")
    assert states(events, "qemu")[-1] in ("failed", "cancelled")
    assert states(events, "vm") == ["running", "paused", "running"]


def test_events_json_error_on_a_signal(qemu: str, tmp_path: Path) -> None:
    """SIGTERM mid-save: the CLI, which knows the signal, says the last word."""
    with source_vm(qemu, tmp_path, paused=False, mem_mib=BIG_MIB) as (vm, sock):
        cmd = [str(VMT), "save", "--qmp", sock, slow_sink(tmp_path / "x"), "--events", "json"]
        with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) as proc:
            wait_active(vm, proc)
            time.sleep(0.6)
            proc.send_signal(signal.SIGTERM)
            err = proc.communicate(timeout=TIMEOUT)[1]
        assert proc.returncode == 143
        assert vm.status() == "running"
    events = [json.loads(line) for line in err.splitlines()]
    check_envelope(events)
    assert any(e["event"] == "progress" and e["bytes"] > 0 for e in events)
    left = "the VM is running, its migration settings as they were"
    assert events[-1] == {
        "v": 1,
        "t": events[-1]["t"],
        "event": "error",
        "ok": False,
        "message": f"interrupted by SIGTERM ({left})",
        "vm": left,
        "vm_state": "running",
        "exit": 143,
    }
    assert states(events, "qemu")[-1] == "cancelled"
    assert states(events, "vm") == ["running", "paused", "running"]


def test_events_json_error_before_the_save(tmp_path: Path) -> None:
    """No monitor: the error event is the last line, and no plain error line."""
    plain = tmp_path / "plain"
    plain.write_text("")
    cmd = [str(VMT), "save", "--qmp", str(plain), f"file:{tmp_path / 'x'}", "--events", "json"]
    result = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 1
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert [e["event"] for e in events] == ["start", "error"]
    assert events[1]["message"] == f"QMP monitor {plain}: not a socket (a regular file)"
    assert events[1]["exit"] == 1 and events[1]["vm"] is None and events[1]["vm_state"] is None


# -- the bar, on a pseudo-terminal ------------------------------------------------------


def screen(raw: bytes) -> list[str]:
    """What a terminal shows after ``raw``: ``\\r`` returns the cursor, ``ESC [K`` erases
    to the end of the line, a newline starts the next one. Any other escape fails."""
    lines: list[str] = []
    row: list[str] = []
    col = 0
    text = raw.decode()
    i = 0
    while i < len(text):
        ch = text[i]
        if text.startswith("\x1b[K", i):
            del row[col:]
            i += 3
            continue
        assert ch != "\x1b", f"unexpected escape at {i}: {text[i : i + 8]!r}"
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(row))
            row, col = [], 0
        else:
            if col < len(row):
                row[col] = ch
            else:
                row.append(ch)
            col += 1
        i += 1
    if row:
        lines.append("".join(row))
    return lines


@contextmanager
def pty_stderr() -> Iterator[tuple[int, int]]:
    """A pseudo-terminal: (master, slave); the slave becomes a child's stderr."""
    master, slave = os.openpty()
    try:
        yield master, slave
    finally:
        os.close(master)
        if slave >= 0:
            try:
                os.close(slave)
            except OSError:
                pass


def run_on_pty(cmd: list[str], **kw: Any) -> tuple[int, bytes]:
    """Run ``cmd`` with its stderr on a pseudo-terminal; its exit status and every byte
    it wrote there."""
    with pty_stderr() as (master, slave):
        proc = subprocess.Popen(cmd, stderr=slave, **kw)
        os.close(slave)
        out = bytearray()
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every slave is closed
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=TIMEOUT)
    return rc, bytes(out)


def test_bar_on_a_terminal_by_default(qemu: str, tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    with source_vm(qemu, tmp_path, paused=False, mem_mib=BIG_MIB) as (_vm, sock):
        rc, raw = run_on_pty([str(VMT), "save", "--qmp", sock, slow_sink(image)])
    assert rc == 0, raw
    # Redrawn in place: many draws, one newline (the final line's).
    assert raw.count(b"\r") >= 4 and raw.count(b"\n") == 1, raw
    assert raw.endswith(b"\n")
    draws = [d for d in raw.decode().split("\r") if d]
    bar = re.compile(r"^save \[#* *\] +\d+%  [\d.]+ [KMG]?i?B / 256\.\d MiB  [\d.]+ MiB/s  ETA ")
    assert sum(1 for d in draws if bar.match(d)) >= 3, draws
    (line,) = screen(raw)
    assert line.startswith("save done: ") and line.endswith("MiB/s)"), line
    payload = image_payload(image)
    assert f"{payload / (1 << 20):.1f} MiB" in line


def test_bar_erased_before_the_error_line(qemu: str, tmp_path: Path) -> None:
    with source_vm(qemu, tmp_path, paused=False, mem_mib=BIG_MIB) as (vm, sock):
        # A target that takes 60 MB slowly, then fails: the bar is up when it does.
        target = f"exec:head -c 60000000 | {slow_copy('/dev/null')}; exit 3"
        rc, raw = run_on_pty([str(VMT), "save", "--qmp", sock, target])
        assert rc == 1
        assert vm.status() == "running"
    assert raw.count(b"\r") >= 2, raw  # the bar was drawn
    lines = screen(raw)
    assert len(lines) == 1, lines  # the error, on a line of its own
    assert lines[0].startswith("vmtransport: error: exec:"), lines
    assert lines[0].endswith("(the VM is running, its migration settings as they were)")


def test_no_bar_unless_a_terminal_or_asked(qemu: str, tmp_path: Path) -> None:
    with source_vm(qemu, tmp_path, paused=False) as (_vm, sock):
        cmd = [str(VMT), "save", "--qmp", sock, f"file:{tmp_path / 'a.img'}", "--after=resume"]
        result = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, check=False)
        assert (result.returncode, result.stderr) == (0, b"")
        # --no-progress on a terminal: nothing either.
        rc, raw = run_on_pty([*cmd[:4], f"file:{tmp_path / 'b.img'}", "--after=resume",
                              "--no-progress"])  # fmt: skip
        assert (rc, raw) == (0, b"")
        # --progress asked: a bar, even into a pipe (no width: 80 columns).
        cmd[4] = f"file:{tmp_path / 'c.img'}"
        result = subprocess.run([*cmd, "--progress"], capture_output=True, timeout=TIMEOUT)
        assert result.returncode == 0
        assert screen(result.stderr)[-1].startswith("save done: ")


# -- the exec: helpers -------------------------------------------------------------------


def test_exec_helpers_print_nothing_unless_asked(qemu: str, tmp_path: Path) -> None:
    """QEMU runs the helpers with its own stderr, here a terminal: without flags they
    print nothing there; --events json is honoured."""
    image = tmp_path / "x.img"
    ram = tmp_path / "src.ram"
    make_ram_file(ram, MEM_MIB, random=True)
    with pty_stderr() as (master, slave):
        tty = os.ttyname(slave)
        vmt = shlex.quote(str(VMT))
        with VM(qemu, tmp_path, name="src", mem_mib=MEM_MIB, ram_file=ram, paused=True) as vm:
            vm.migrate(f"exec:{vmt} save file:{image} 2>{tty}")
            assert vm.wait_migration()["status"] == "completed"
        load(qemu, tmp_path, f"exec:{vmt} restore file:{image} 2>{tty}")
        assert select.select([master], [], [], 0.5)[0] == []  # not a byte
        events = tmp_path / "events"
        load(qemu, tmp_path, f"exec:{vmt} restore --events json file:{image} 2>{events}")
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "result"
    assert states(lines, "pipeline") == ["started", "eof", "committing", "complete"]
    assert lines[-1]["bytes"] == image.stat().st_size
    assert lines[-2]["total"] == image.stat().st_size and lines[-2]["fraction"] == 1.0


def test_plain_helpers_take_the_flags(tmp_path: Path) -> None:
    """The pipeline's figures alone: a save (no total: a stream on stdin has no known
    length), a restore and a copy (the image's length is the total)."""
    raw = SyntheticStream(size=16 << 20).write_to(tmp_path / "s.raw")
    image = tmp_path / "a.img"
    with open(raw, "rb") as stdin:
        save = subprocess.run(
            [str(VMT), "save", "--events", "json", f"file:{image}"],
            stdin=stdin, capture_output=True, timeout=TIMEOUT, check=True,
        )  # fmt: skip
    events = [json.loads(line) for line in save.stderr.splitlines()]
    check_envelope(events)
    assert events[-1]["event"] == "result" and events[-1]["path"] == str(image)
    assert events[-1]["bytes"] == image_payload(image) == raw.stat().st_size
    assert all(e["total"] is None for e in events if e["event"] == "progress")
    copy = subprocess.run(
        [str(VMT), "copy", "--events", "json", f"file:{image}", f"file:{tmp_path / 'b.img'}"],
        capture_output=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    events = [json.loads(line) for line in copy.stderr.splitlines()]
    assert events[0]["source"] == f"file:{image}" and events[-1]["bytes"] == image.stat().st_size
    rc, out = run_on_pty(
        [str(VMT), "copy", f"file:{image}", f"file:{tmp_path / 'c.img'}"],
    )
    assert rc == 0 and screen(out)[-1].startswith("copy done: ")
    failed = subprocess.run(
        [str(VMT), "restore", "--events", "json", f"file:{tmp_path / 'none'}"],
        capture_output=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    events = [json.loads(line) for line in failed.stderr.splitlines()]
    assert [e["event"] for e in events] == ["start", "state", "error"]
    assert states(events, "pipeline") == ["failed"]
    error = events[-1]
    assert error["exit"] == failed.returncode == 1
    assert str(tmp_path / "none") in error["message"]


# -- the renderers, without QEMU ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Collect:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def test_rate_eta_and_fraction_from_qemu() -> None:
    clock, out = Clock(), Collect()
    reporter = Reporter(out, interval=3600, clock=clock)
    reporter.start("save")
    clock.now += 1
    reporter.bytes = 300
    # QEMU sent 500 (200 still in the pump's buffers) and has 700 to go: 1200 expected.
    ram = {"total": 1100, "transferred": 500, "remaining": 700}
    reporter.migration({"status": "active", "ram": ram})
    with reporter._lock:
        event = reporter._progress()
    # 300 bytes in 1 s, 900 to go.
    assert (event["rate"], event["fraction"], event["eta"]) == (300.0, 0.25, 3.0)
    assert event["total"] == 1100
    assert event["qemu"] == {
        "status": "active", "ram_total": 1100, "ram_transferred": 500, "ram_remaining": 700
    }  # fmt: skip
    reporter.qemu_state("active")
    reporter.qemu_state("active")  # a repeat is no change
    reporter.result(bytes=1200, seconds=2.0)
    reporter.error("too late")  # the end is said once
    kinds = [e["event"] for e in out.events]
    assert kinds == ["start", "state", "progress", "result"]
    assert out.events[-1]["rate"] == 600.0


def test_bar_fits_the_terminal() -> None:
    event = {"bytes": 3 << 30, "total": 4 << 30, "fraction": 0.75, "rate": 800 << 20, "eta": 75}
    line = bar_line(event, "save", "active", 80)
    assert line.startswith("save [") and " 75%  3.0 GiB / 4.0 GiB  800.0 MiB/s  ETA 1:15" in line
    assert len(line) < 80
    from io import StringIO

    out = StringIO()
    bar = BarRenderer(out, width=30)
    bar.emit({"event": "progress", **event})
    drawn = out.getvalue()
    assert drawn.startswith("\r") and drawn.endswith("\x1b[K")
    assert len(drawn) - len("\r\x1b[K") <= 29
    bar.emit({"event": "error"})
    assert out.getvalue().endswith("\r\x1b[K") and not bar.drawn


def test_a_stderr_nobody_reads_stalls_the_report_not_the_save(tmp_path: Path) -> None:
    """--events json into a full pipe: the image is complete all the same; the helper
    then gives up its report after a bounded wait (Reporter.close) and exits 0."""
    raw = SyntheticStream(size=64 << 20).write_to(tmp_path / "s.raw")
    image = tmp_path / "a.img"
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 4096)
    except BlockingIOError:
        pass  # full: every write the helper makes to its stderr blocks
    os.set_blocking(w, True)
    with open(raw, "rb") as stdin:
        proc = subprocess.Popen(
            [str(VMT), "save", "--events", "json", f"file:{image}"], stdin=stdin, stderr=w
        )
    os.close(w)
    try:
        deadline = time.monotonic() + 30
        verified = False
        while not verified and time.monotonic() < deadline:
            time.sleep(0.1)
            check = [str(VMT), "verify", str(image)]
            verified = image.exists() and subprocess.run(check, capture_output=True).returncode == 0
        assert verified and proc.poll() is None  # saved while the report is stuck
    finally:
        with os.fdopen(r, "rb") as pipe:
            pipe.read()
        assert proc.wait(timeout=TIMEOUT) == 0


def test_docs_example_runs(qemu: str, tmp_path: Path) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "events.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", doc, re.S)
    image = tmp_path / "a.sav"
    err = io.StringIO()
    with source_vm(qemu, tmp_path, paused=False) as (vm, sock):
        code = block.replace("/run/vm/qmp.sock", sock).replace("/var/lib/vm/a.sav", str(image))
        with contextlib.redirect_stderr(err):
            exec(compile(code, "docs/events.md", "exec"), {"__name__": "docs"})
        assert vm.status() == "postmigrate"
    events = [json.loads(line) for line in err.getvalue().splitlines()]
    check_envelope(events)
    assert events[0]["event"] == "start" and events[-1]["event"] == "result"
    assert events[-1]["path"] == str(image) and events[-1]["bytes"] == image_payload(image)
