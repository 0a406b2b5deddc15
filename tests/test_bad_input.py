"""Every bad input gets one line: ``vmtransport: error: <input>: <reason>`` and exit 2
(usage, URI) or 1 (I/O), never a traceback, whatever the arguments, the URI or the
state of stdin and stdout (issue 11, point 4). Drives the real console script.
BAD_INPUT_EXAMPLES=N runs the property test with N examples (default 200, ~15 s).

Not ours to fix: with a directory as stdin or stdout, CPython refuses to start
("Fatal Python error: init_sys_streams") before any of vmtransport runs.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from helpers import VMT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmtransport.testing import SyntheticStream

JUNK = b"\xac\x3c\x72\xf5 not a migration stream\n" * 10
STREAM = bytes(SyntheticStream(4, seed=3))
BIG = str(1 << 63)


def run(
    args: list[str],
    cwd: Path,
    stdin: int | None = None,
    stdout: int | None = None,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(VMT), *args],
        cwd=cwd,
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=30,
        pass_fds=pass_fds,
    )


def one_line(p: subprocess.CompletedProcess[bytes], code: int, *words: str) -> str:
    err = p.stderr.decode(errors="replace")
    assert p.returncode == code, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("vmtransport: error: "), err
    for w in words:
        assert w in err
    return err


@pytest.fixture
def junk(tmp_path: Path) -> Path:
    p = tmp_path / "junk"
    p.write_bytes(JUNK)
    return p


@pytest.mark.parametrize("scheme", ["file", "odirect"])
@pytest.mark.parametrize("offset", [BIG, str(1 << 64), "-1", "0x", "1e3"])
@pytest.mark.fault(
    "offset= out of range or not a number (2**63, 2**64, -1, 0x, 1e3)",
    direction="cli",
    vm="n/a",
    disk="nothing created",
    exit="2",
    message="names the option: offset='...'",
)
def test_offset_out_of_range_save(tmp_path: Path, junk: Path, scheme: str, offset: str) -> None:
    with open(junk, "rb") as f:
        p = run(["save", f"{scheme}:{tmp_path}/out,offset={offset}"], tmp_path, stdin=f.fileno())
    one_line(p, 2, f"offset={offset!r}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheme", ["file", "odirect"])
@pytest.mark.fault(
    "offset= of 2**63 on restore",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="2",
    message="'out of range'",
)
def test_offset_out_of_range_restore(tmp_path: Path, junk: Path, scheme: str) -> None:
    p = run(["restore", f"{scheme}:{junk},offset={BIG}"], tmp_path, stdout=subprocess.DEVNULL)
    one_line(p, 2, "out of range")


@pytest.mark.fault(
    "offset= of 2**63-1 (valid off_t, refused by the kernel)",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="1",
    message="'seeking file:...'",
)
def test_largest_offset_is_an_io_error(tmp_path: Path, junk: Path) -> None:
    """2**63-1 is a valid off_t: the kernel refuses it, one line, exit 1."""
    p = run(["restore", f"file:{junk},offset={(1 << 63) - 1}"], tmp_path, stdout=subprocess.DEVNULL)
    one_line(p, 1, "seeking file:")


@pytest.mark.parametrize("target", ["2147483648", str(1 << 64), "99999999999999999999"])
@pytest.mark.fault(
    "fd: number beyond 2**31-1",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="2",
    message="names the URI fd:N",
)
def test_fd_number_out_of_range(tmp_path: Path, junk: Path, target: str) -> None:
    with open(junk, "rb") as f:
        one_line(run(["save", f"fd:{target}"], tmp_path, stdin=f.fileno()), 2, f"fd:{target}")
    one_line(run(["restore", f"fd:{target}"], tmp_path, stdout=subprocess.DEVNULL), 2)


@pytest.mark.fault(
    "fd: with a Unicode digit",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="2",
    message="names the URI",
)
def test_fd_unicode_digit(tmp_path: Path) -> None:
    one_line(run(["restore", "fd:\u00b2"], tmp_path, stdout=subprocess.DEVNULL), 2, "fd:")


@contextmanager
def closed(fd: int) -> Iterator[None]:
    """Run the child with ``fd`` closed (subprocess cannot close 0-2 itself)."""
    saved = os.dup(fd)
    os.close(fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


@pytest.mark.fault(
    "save with stdin closed",
    direction="cli",
    vm="n/a",
    disk="nothing created",
    exit="2",
    message="'stdin: not open'",
)
def test_save_with_stdin_closed(tmp_path: Path) -> None:
    with closed(0):
        p = subprocess.run(
            [str(VMT), "save", "file:out"],
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            timeout=30,
        )
    one_line(p, 2, "stdin: not open")
    assert not (tmp_path / "out").exists()


@pytest.mark.fault(
    "restore with stdout closed",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="2",
    message="'stdout: not open'",
)
def test_restore_with_stdout_closed(tmp_path: Path, junk: Path) -> None:
    p = subprocess.run(
        f"exec {VMT} restore file:{junk} >&-",
        shell=True,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        timeout=30,
    )
    one_line(p, 2, "stdout: not open")


@pytest.mark.fault(
    "restore fd:1 with stdout a file",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="1",
    message="'reading fd:1 ...'",
)
def test_restore_from_fd_1_into_a_file(tmp_path: Path) -> None:
    with open(tmp_path / "out", "wb") as f:
        p = run(["restore", "fd:1"], tmp_path, stdout=f.fileno())
    one_line(p, 1, "reading fd:1")


@pytest.mark.parametrize("args", [["plugins"], ["inspect", "s"], ["inspect", "--json", "s"]])
@pytest.mark.fault(
    "inspect or plugins into /dev/full or a closed stdout",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="1 (full), 2 (closed)",
    message="'writing stdout: No space ...' / 'stdout: not open'",
)
def test_report_to_a_closed_or_full_stdout(tmp_path: Path, junk: Path, args: list[str]) -> None:
    """A report that cannot be written is an error, not exit 0 with the report lost."""
    (tmp_path / "s").write_bytes(STREAM)
    with open("/dev/full", "wb") as full:
        one_line(run(args, tmp_path, stdout=full.fileno()), 1, "writing stdout: No space")
    with closed(1):
        p = subprocess.run([str(VMT), *args], cwd=tmp_path, stderr=subprocess.PIPE, timeout=30)
    one_line(p, 2, "stdout: not open")


@pytest.mark.xfail(
    strict=True,
    reason="CPython itself refuses to start with a directory "
    "as stdin (Fatal Python error: init_sys_streams), before vmtransport runs",
)
@pytest.mark.fault(
    "a directory as stdin",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="1",
    message="one line",
)
def test_directory_as_stdin(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        p = run(["save", "file:out"], tmp_path, stdin=fd)
    finally:
        os.close(fd)
    assert p.returncode == 1
    one_line(p, 1)


@pytest.mark.fault(
    "odirect: on a character device (/dev/null), save",
    direction="cli",
    vm="n/a",
    disk="written in place",
    exit="0",
    message="none (no fallback warning)",
)
def test_odirect_character_device_save(tmp_path: Path) -> None:
    """Written in place, plain I/O: no fallback warning, no sync error."""
    src = tmp_path / "s"
    src.write_bytes(STREAM)
    with open(src, "rb") as f:
        p = run(["save", "odirect:/dev/null,format=raw"], tmp_path, stdin=f.fileno())
    assert p.returncode == 0 and p.stderr == b"", p.stderr


@pytest.mark.fault(
    "odirect: on a FIFO, save and restore",
    direction="cli",
    vm="n/a",
    disk="written and read in place",
    exit="0",
    message="none (no fallback warning)",
)
def test_odirect_fifo_both_ways(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    src = tmp_path / "s"
    src.write_bytes(STREAM)
    with subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE) as cat, open(src, "rb") as f:
        p = run(["save", f"odirect:{fifo},format=raw"], tmp_path, stdin=f.fileno())
        got = cat.communicate(timeout=30)[0]
    assert p.returncode == 0 and p.stderr == b"", p.stderr
    assert got == STREAM
    with subprocess.Popen(f"cat {src} > {fifo}", shell=True) as feeder:
        r = run(["restore", f"odirect:{fifo}"], tmp_path, stdout=subprocess.PIPE)
        feeder.wait(timeout=30)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    assert r.stdout == STREAM


@pytest.mark.fault(
    "odirect: on a character device (/dev/null), restore",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="1",
    message="one line, no O_DIRECT warning",
)
def test_odirect_character_device_restore_no_warning(tmp_path: Path) -> None:
    err = one_line(run(["restore", "odirect:/dev/null"], tmp_path, stdout=subprocess.DEVNULL), 1)
    assert "O_DIRECT" not in err


@pytest.mark.fault(
    "odirect: on a directory, save and restore",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="1",
    message="'odirect:d: is a directory'",
)
def test_odirect_directory_refused(tmp_path: Path, junk: Path) -> None:
    (tmp_path / "d").mkdir()
    one_line(
        run(["restore", "odirect:d"], tmp_path, stdout=subprocess.DEVNULL),
        1,
        "odirect:d: is a directory",
    )
    with open(junk, "rb") as f:
        one_line(
            run(["save", "odirect:d"], tmp_path, stdin=f.fileno()), 1, "odirect:d: is a directory"
        )


# --- property: random URIs and descriptor states -----------------------------------------

SCHEMES = ["file", "odirect", "fd", "exec", "tcp", "", "FILE", "zstd", "x" * 3]
#: exec: runs its target in a shell: only these, never generated text
EXEC_TARGETS = ["true", "false", "cat", "cat >/dev/null", "head -c 10", "exit 3", ""]
NUMBERS = [
    "0",
    "1",
    "-1",
    "4096",
    BIG,
    str((1 << 63) - 1),
    str(1 << 64),
    "0x1000",
    "abc",
    "",
    "1.5",
    "\u00b2",
    "2147483648",
    "4095",
]
OPTIONS = ["offset", "format", "fallback", "bogus", ""]
WORD = st.text("abcdz019._-", max_size=8)
STATES = ["closed", "devnull", "dir", "file", "pipe-junk", "pipe-empty"]


@st.composite
def uri(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(SCHEMES))
    if scheme == "exec":
        target = draw(st.sampled_from(EXEC_TARGETS))
    elif scheme == "fd":
        target = draw(st.sampled_from([*NUMBERS, "stdin", "x y"]))
    else:
        target = draw(st.sampled_from(["junk", "d", "/dev/null", "/dev/zero", "missing/x"]) | WORD)
    opts = draw(
        st.lists(
            st.tuples(
                st.sampled_from(OPTIONS) | WORD,
                st.sampled_from([*NUMBERS, "image", "raw", "error"]) | WORD,
                st.booleans(),
            ),
            max_size=3,
        )
    )
    text = target + "".join(f",{k}={v}" if eq else f",{k}" for k, v, eq in opts)
    if draw(st.booleans()):
        text += draw(st.sampled_from([",", ",,", "=", ":", ""]))
    return f"{scheme}:{text}" if scheme or draw(st.booleans()) else text


@st.composite
def command(draw: st.DrawFn) -> list[str]:
    cmd = draw(st.sampled_from(["save", "restore", "copy", "inspect", "verify", "plugins"]))
    if cmd == "plugins":
        return [cmd]
    args = [cmd, draw(uri())]
    if cmd == "copy":
        args.append(draw(uri()))
    if cmd in ("save", "copy") and draw(st.booleans()):
        args += ["--name", draw(WORD)]
    if cmd == "inspect" and draw(st.booleans()):
        args.append("--json")
    return args


def descriptor(state: str, fd: int, tmp: Path, stack: ExitStack) -> int | None:
    """The descriptor to give the child as ``fd`` (None: to be closed, last)."""
    if state == "closed":
        return None
    if state == "devnull":
        return stack.enter_context(open(os.devnull, "r+b")).fileno()
    if state == "dir":
        d = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        stack.callback(os.close, d)
        return d
    if state == "file":
        return stack.enter_context(open(tmp / "junk", "r+b")).fileno()
    r, w = os.pipe()
    stack.callback(os.close, r)
    if fd == 0:
        if state == "pipe-junk":
            os.write(w, JUNK[:100])
        os.close(w)
        return r
    stack.callback(os.close, w)  # the reader stays open: what a refusal writes fits
    return w


@settings(
    max_examples=int(os.environ.get("BAD_INPUT_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(args=command(), stdin=st.sampled_from(STATES), stdout=st.sampled_from(STATES))
@pytest.mark.fault(
    "random URIs, options and stdin/stdout states (hypothesis)",
    direction="cli",
    vm="n/a",
    disk="nothing saved, no temporaries",
    exit="1 or 2",
    message="one line 'vmtransport: error: ...', no traceback",
)
def test_random_input_gets_one_line(
    tmp_path: Path, args: list[str], stdin: str, stdout: str
) -> None:
    work = tmp_path / "w"
    if not work.exists():
        work.mkdir()
        (work / "junk").write_bytes(JUNK)
        (work / "d").mkdir()
    before = sorted(p.name for p in work.iterdir())
    with ExitStack() as stack:
        fds = [descriptor(stdin, 0, work, stack), descriptor(stdout, 1, work, stack)]
        for fd, given_fd in enumerate(fds):  # after the opens, which could reuse the number
            if given_fd is None:
                stack.enter_context(closed(fd))
        p = subprocess.run(
            [str(VMT), *args],
            cwd=work,
            stdin=fds[0] if fds[0] is not None else None,
            stdout=fds[1] if fds[1] is not None else None,
            stderr=subprocess.PIPE,
            timeout=30,
            close_fds=True,
        )
    err = p.stderr.decode(errors="replace")
    if "dir" in (stdin, stdout):
        # CPython refuses to start first (see test_directory_as_stdin): not ours to fix
        assert p.returncode == 1 and "init_sys_streams" in err, err
        return
    if args == ["plugins"] and stdout != "closed":
        assert p.returncode == 0 and err == "", err  # the one command that takes no input
        return
    # Every input is junk, empty or missing: nothing else can succeed.
    assert p.returncode in (1, 2), (p.returncode, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    if any(a.startswith("exec:") for a in args):
        # an exec: command's own stderr passes through (the shell's "not found"...)
        lines = [line for line in lines if line.startswith("vmtransport")]
    assert len(lines) == 1 and lines[0].startswith("vmtransport: error: "), err
    assert err.endswith("\n")
    assert sorted(p.name for p in work.iterdir()) == before  # nothing saved, no temporaries
