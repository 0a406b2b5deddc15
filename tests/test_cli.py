"""The command line: exit codes (0 ok, 1 I/O, 2 usage), one-line errors without
tracebacks (unless -v), --version, and ``plugins``. Runs the real console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vmtransport
from vmtransport._cli import main
from vmtransport.testing import SyntheticStream

VMT = Path(sys.executable).parent / "vmtransport"
TIMEOUT = 30


def vmt(
    *args: str, input: bytes = b"", stdin: int | None = None, stdout: int = subprocess.PIPE
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(VMT), *args],
        input=None if stdin is not None else input,
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=TIMEOUT,
        check=False,
    )


def only_error_line(r: subprocess.CompletedProcess[bytes]) -> str:
    text = r.stderr.decode(errors="replace")
    assert "Traceback" not in text
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("vmtransport: error: "), text
    return lines[0].removeprefix("vmtransport: error: ")


def test_version() -> None:
    r = vmt("--version")
    assert r.returncode == 0
    assert r.stdout.decode() == f"vmtransport {vmtransport.__version__}\n"
    assert r.stderr == b""


def test_help() -> None:
    r = vmt("--help")
    assert r.returncode == 0
    out = r.stdout.decode()
    for command in ("save", "restore", "copy", "plugins"):
        assert command in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "the following arguments are required: COMMAND"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (("save",), "the following arguments are required: URI"),
        (("copy", "file:/a"), "the following arguments are required: DST"),
        (("restore", "file:/a", "extra"), "unrecognized arguments: extra"),
        (("--bogus", "plugins"), "unrecognized arguments: --bogus"),
        (("save", "no-colon"), "not a URI 'no-colon'"),
        (("restore", "nfs:/srv/a"), "unknown scheme 'nfs' in URI 'nfs:/srv/a' (known: exec"),
        (("save", "file:/x,offset=-1"), "option offset='-1' in URI 'file:/x,offset=-1'"),
        (("save", "odirect:/x,offset=100"), "must be a multiple of 4096"),
        (("save", "file:/x,bogus=1"), "unknown option 'bogus'"),
        (("copy", "file:/x", "fd:"), "empty target in URI 'fd:'"),
    ],
)
@pytest.mark.fault(
    "usage errors (unknown scheme, option, command...)",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="2",
    message="one line naming the input",
)
def test_usage_errors_exit_2(args: tuple[str, ...], expected: str) -> None:
    r = vmt(*args)
    assert r.returncode == 2
    assert expected in only_error_line(r)
    assert r.stdout == b""


@pytest.mark.fault(
    "copy with a bad target URI",
    direction="cli",
    vm="n/a",
    disk="the source command never started",
    exit="2",
    message="'unknown scheme ...'",
)
def test_copy_validates_both_uris_before_any_io(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    r = vmt("copy", f"exec:touch {marker}", "nfs:/srv/a")
    assert r.returncode == 2
    assert "unknown scheme 'nfs'" in only_error_line(r)
    assert not marker.exists()  # the source command never started


@pytest.mark.fault(
    "restore of a missing file, save into a missing directory",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="1",
    message="names the URI: 'No such file or directory' / 'does not exist'",
)
def test_io_errors_exit_1(tmp_path: Path) -> None:
    r = vmt("restore", f"file:{tmp_path}/missing.sav")
    assert r.returncode == 1
    line = only_error_line(r)
    assert f"file:{tmp_path}/missing.sav" in line
    assert "No such file or directory" in line
    r = vmt("save", f"file:{tmp_path}/no/dir/x", input=b"abc")
    assert r.returncode == 1
    assert "does not exist" in only_error_line(r)


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
@pytest.mark.fault(
    "-v with an I/O error",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="1",
    message="a traceback, then the one line",
)
def test_verbose_adds_a_traceback_to_an_io_error(tmp_path: Path, flag: str) -> None:
    r = vmt(flag, "restore", f"file:{tmp_path}/missing.sav")
    assert r.returncode == 1
    text = r.stderr.decode()
    assert "Traceback (most recent call last)" in text
    assert "FileNotFoundError" in text  # the cause is kept
    assert text.splitlines()[-1].startswith("vmtransport: error: opening file:")


def test_verbose_reports_statistics(tmp_path: Path) -> None:
    stream = bytes(SyntheticStream(3))
    r = vmt("-v", "save", f"file:{tmp_path}/a", input=stream)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert f"saved to file:{tmp_path}/a: " in lines[0]
    assert " bytes in " in lines[0]
    r = vmt("restore", f"file:{tmp_path}/a")
    assert r.returncode == 0
    assert r.stderr == b""  # quiet without -v
    assert r.stdout == stream


@pytest.mark.fault(
    "save with a terminal as stdin",
    direction="cli",
    vm="n/a",
    disk="nothing created",
    exit="2",
    message="'stdin, which is a terminal'",
)
def test_save_refuses_a_terminal_on_stdin(tmp_path: Path) -> None:
    controller, terminal = os.openpty()
    try:
        r = vmt("save", f"file:{tmp_path}/a", stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    assert r.returncode == 2
    assert "stdin, which is a terminal" in only_error_line(r)
    assert not (tmp_path / "a").exists()


@pytest.mark.fault(
    "restore with a terminal as stdout",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="2",
    message="'stdout, which is a terminal'",
)
def test_restore_refuses_a_terminal_on_stdout(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"stream")
    controller, terminal = os.openpty()
    try:
        r = vmt("restore", f"file:{tmp_path}/a", stdout=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    assert r.returncode == 2
    assert "stdout, which is a terminal" in only_error_line(r)


@pytest.mark.fault(
    "restore into a reader that goes away (QEMU dies)",
    direction="restore",
    vm="n/a (the reader is gone)",
    disk="n/a",
    exit="1",
    message="one line: 'Broken pipe'",
)
def test_restore_into_a_reader_that_goes_away(tmp_path: Path) -> None:
    image = tmp_path / "a"
    image.write_bytes(bytes(SyntheticStream(1000)))
    rfd, wfd = os.pipe()
    try:
        proc = subprocess.Popen(
            [str(VMT), "restore", f"file:{image}"], stdout=wfd, stderr=subprocess.PIPE
        )
        os.close(wfd)
        wfd = -1
        assert len(os.read(rfd, 10)) > 0
        os.close(rfd)
        rfd = -1
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        for fd in (rfd, wfd):
            if fd >= 0:
                os.close(fd)
    assert proc.returncode == 1
    lines = err.decode().splitlines()
    assert len(lines) == 1, lines
    assert "Broken pipe" in lines[0]


def test_plugins_lists_the_builtins() -> None:
    r = vmt("plugins")
    assert r.returncode == 0
    assert r.stderr == b""
    # the repository's own plugins, which scripts/setup.sh installs, are listed too
    lines = [ln for ln in r.stdout.decode().splitlines() if not ln.startswith("zstd:")]
    rows = [line.split(None, 3) for line in lines]
    assert [row[0] for row in rows] == ["exec:", "fd:", "file:", "odirect:"]
    for row in rows:
        assert row[1:3] == ["builtin", "built-in"]
        assert row[3]  # a summary
    # Columns line up: every summary starts at the same place.
    starts = {line.index(row[3]) for line, row in zip(lines, rows, strict=True)}
    assert len(starts) == 1


def test_main_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    assert "odirect:" in capsys.readouterr().out
    assert main(["copy", "nfs:/a", "file:/b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vmtransport: error: unknown scheme 'nfs'")
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"vmtransport {vmtransport.__version__}\n"


@pytest.mark.parametrize("command", ["inspect", "verify", "plugins"])
@pytest.mark.fault(
    "inspect, verify or plugins into a closed pipe",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="141 (as SIGPIPE)",
    message="none",
)
def test_a_report_to_a_reader_that_went_away(tmp_path: Path, command: str) -> None:
    """``vmtransport inspect IMAGE | head`` with head gone: no traceback, and the status
    a writer killed by SIGPIPE would have."""
    image = tmp_path / "a"
    assert vmt("save", f"file:{image}", input=bytes(SyntheticStream(10))).returncode == 0
    rfd, wfd = os.pipe()
    os.close(rfd)
    try:
        r = vmt(*([command] if command == "plugins" else [command, str(image)]), stdout=wfd)
    finally:
        os.close(wfd)
    assert r.returncode == 141
    assert r.stderr == b""
