"""The fast start of ``restore --qmp`` (``vmtransport._handoff``): the blocking QMP
client (``qmp._sync``) says what the trio client says, within the same deadlines; the
trio client adopts its connection without losing what it read; the command line's
errors keep ``restore_vm``'s order; a signal during the hand-over still unwinds.

Hostile monitors are scripted fakes on a real UNIX socket (a state machine's unit
test); the rest runs against real QEMU 7.2 and 10.0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import VMT, Saved, one_error_line
from qemuvm import VM, VMError, files_equal
from qmp_vms import destination, qmp_socket, source_vm

from vmtransport import Interrupted, QMPConnectionError, QMPError, qmp
from vmtransport._errors import interrupt_on_signals
from vmtransport._handoff import UNTOUCHED, prepare
from vmtransport._pipeline import run_trio
from vmtransport._restore_vm import resume_restore
from vmtransport.qmp._sync import connect_sync, open_sync

GREETING = {"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}}, "capabilities": []}}
TIMEOUT = 120

Script = Callable[[socket.socket], None]


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def command_id(conn: socket.socket) -> int:
    """Read one command line from the client; its id."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            raise EOFError
        buf += chunk
    return int(json.loads(buf)["id"])


@contextmanager
def fake_monitor(script: Script) -> Iterator[str]:
    """A UNIX socket whose first client gets ``script``; its path."""
    path = qmp_socket("fake")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:  # closed when the script ends
            try:
                script(conn)
            except (OSError, EOFError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.close()
        os.unlink(path)


def mute(conn: socket.socket) -> None:
    time.sleep(5)


def closes(conn: socket.socket) -> None:
    pass


def garbage(conn: socket.socket) -> None:
    conn.sendall(b"hello\n")
    time.sleep(5)


def no_capabilities(conn: socket.socket) -> None:
    conn.sendall(line(GREETING))
    command_id(conn)
    time.sleep(5)


def refuses_capabilities(conn: socket.socket) -> None:
    conn.sendall(line(GREETING))
    cmd = command_id(conn)
    conn.sendall(line({"error": {"class": "GenericError", "desc": "no"}, "id": cmd}))
    time.sleep(5)


def negotiated(then: Script) -> Script:
    def script(conn: socket.socket) -> None:
        conn.sendall(line(GREETING))
        conn.sendall(line({"return": {}, "id": command_id(conn)}))
        then(conn)

    return script


def error_reply(conn: socket.socket) -> None:
    cmd = command_id(conn)
    conn.sendall(line({"error": {"class": "CommandNotFound", "desc": "not here"}, "id": cmd}))
    time.sleep(5)


def half_reply(conn: socket.socket) -> None:
    command_id(conn)
    conn.sendall(b'{"return": {"sta')


def stalls(conn: socket.socket) -> None:
    command_id(conn)
    time.sleep(5)


async def trio_outcome(path: str, command: str | None) -> BaseException:
    try:
        async with await qmp.connect(path, timeout=0.5) as client:
            assert command is not None
            await client.execute(command, timeout=0.5)
    except (QMPError, QMPConnectionError) as exc:
        return exc
    raise AssertionError("no error")


def sync_outcome(path: str, command: str | None) -> BaseException:
    try:
        client = connect_sync(path, timeout=0.5)
    except (QMPError, QMPConnectionError) as exc:
        return exc
    try:
        assert command is not None
        client.execute(command, timeout=0.5)
    except (QMPError, QMPConnectionError) as exc:
        return exc
    finally:
        client.close()
    raise AssertionError("no error")


@pytest.mark.parametrize(
    ("script", "command", "says"),
    [
        (mute, None, "sent no QMP greeting within 0.5 s"),
        (closes, None, "closed the connection without a greeting"),
        (garbage, None, "sent a line that is not JSON"),
        (no_capabilities, None, "did not answer qmp_capabilities within 0.5 s"),
        (refuses_capabilities, None, "qmp_capabilities failed: GenericError: no"),
        (negotiated(error_reply), "query-x", "query-x failed: CommandNotFound: not here"),
        (negotiated(half_reply), "query-x", "closed the connection in the middle of a message"),
        (negotiated(stalls), "query-x", "no reply to query-x within 0.5 s"),
    ],
    ids=["mute", "closes", "garbage", "no-caps", "caps-refused", "error", "eof-mid", "stall"],
)
def test_sync_client_says_what_the_trio_client_says(
    script: Script, command: str | None, says: str
) -> None:
    """Same error class, same one-line message, within the same deadline: the command
    line's errors are the same whichever client met the monitor first."""
    with fake_monitor(script) as path:
        start = time.monotonic()
        from_sync = sync_outcome(path, command)
        assert time.monotonic() - start < 3
        said_sync = str(from_sync).replace(path, "PATH")
    with fake_monitor(script) as path:
        from_trio = trio.run(trio_outcome, path, command)
        said_trio = str(from_trio).replace(path, "PATH")
    assert type(from_sync) is type(from_trio)
    assert said_sync == said_trio
    assert said_sync.startswith("QMP monitor PATH: ")
    assert says in said_sync


def test_adopted_client_keeps_what_the_sync_phase_read() -> None:
    """Events read while the blocking client waited for replies, and half an event
    still in its buffer, reach the trio client's listeners, in order; ids go on."""

    def event(n: int) -> bytes:
        return line(
            {"event": f"E{n}", "data": {"n": n}, "timestamp": {"seconds": n, "microseconds": 0}}
        )

    def script(conn: socket.socket) -> None:
        cmd = command_id(conn)
        conn.sendall(event(1) + line({"return": {"a": 1}, "id": cmd}) + event(2)[:10])
        time.sleep(0.3)  # the blocking client has its reply, and half of E2, by now
        conn.sendall(event(2)[10:] + event(3))
        cmd = command_id(conn)
        conn.sendall(line({"return": {"b": cmd}, "id": cmd}))
        time.sleep(5)

    with fake_monitor(negotiated(script)) as path:
        sync = connect_sync(path)
        assert sync.execute("query-a") == {"a": 1}
        assert [e.name for e in sync.events] == ["E1"]

        async def adopted() -> tuple[list[str], Any]:
            with trio.fail_after(10):
                async with qmp.QMPClient.adopt(sync) as client:
                    assert client.greeting is not None and client.greeting.version == (10, 0, 2)
                    with client.listen() as events:
                        names = [(await events.receive()).name for _ in range(3)]
                        value = await client.execute("query-b")
                    return names, value

        names, value = trio.run(adopted)
    assert names == ["E1", "E2", "E3"]
    assert value == {"b": 3}  # qmp_capabilities was 1, query-a 2
    with pytest.raises(QMPConnectionError, match="connection handed over"):
        sync.execute("query-c")


def test_adopting_a_broken_connection_stays_broken() -> None:
    with fake_monitor(negotiated(half_reply)) as path:
        sync = connect_sync(path)
        with pytest.raises(QMPConnectionError) as err:
            sync.execute("query-x")

        async def adopted() -> None:
            async with qmp.QMPClient.adopt(sync) as client:
                with pytest.raises(QMPConnectionError) as again:
                    await client.execute("query-status")
                assert str(again.value) == str(err.value)

        trio.run(adopted)


@pytest.mark.qemu
def test_sync_client_on_real_qemu(qemu: str, tmp_path: Path) -> None:
    """Against QEMU: a STOP event read while ``stop`` ran is the adopted client's first
    event; getfd passes the descriptor."""
    with source_vm(qemu, tmp_path, paused=False) as (vm, sock):
        sync = open_sync(sock)
        (status,) = sync.negotiate(("query-status", None))
        assert status["status"] == "running"
        with pytest.raises(QMPError) as err:
            sync.execute("no-such-command")
        assert err.value.error_class == "CommandNotFound"
        sync.execute("stop")
        r, w = os.pipe()
        try:
            sync.getfd(r, "handoff-test")
            link = f"pipe:[{os.fstat(r).st_ino}]"
            assert link in {
                os.readlink(f"/proc/{vm.pid}/fd/{n}") for n in os.listdir(f"/proc/{vm.pid}/fd")
            }
        finally:
            os.close(r)
            os.close(w)

        async def adopted() -> str:
            with trio.fail_after(30):
                async with qmp.QMPClient.adopt(sync) as client:
                    with client.listen("STOP") as events:
                        assert (await events.receive()).name == "STOP"
                    await client.closefd("handoff-test")
                    return str((await client.execute("query-status"))["status"])

        assert trio.run(adopted) == "paused"
        assert vm.status() == "paused"


@pytest.fixture
def own_signals() -> Iterator[None]:
    """The command line's signal handling for the test, pytest's back afterwards."""
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    interrupt_on_signals()
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def never_ran(vm: VM) -> str:
    """Where a restore that failed (or was cut short) left the destination, once it
    settled: "exit N", or a run state that is not running."""
    deadline = time.monotonic() + 30
    while vm.returncode is None and time.monotonic() < deadline:
        try:
            status = vm.status()
        except VMError:
            continue  # exiting
        assert status != "running"
        if status != "inmigrate":
            return status
        time.sleep(0.05)
    return f"exit {vm.returncode}"


def vmt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VMT), *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


@pytest.mark.qemu
def test_qemu_not_waiting_comes_before_the_image(qemu: str, tmp_path: Path) -> None:
    """The image is opened while QEMU answers, but the errors keep restore_vm's order:
    QEMU not waiting first, the image's own error only when QEMU waits."""
    missing = tmp_path / "missing.img"
    with source_vm(qemu, tmp_path, paused=False) as (vm, sock):
        result = vmt("restore", "--qmp", sock, f"file:{missing}")
        assert result.returncode == 2
        assert "QEMU is running, not waiting for a migration" in one_error_line(result.stderr)
        assert vm.status() == "running"
    with destination(qemu, tmp_path, bios=False) as (dst, dsock):
        result = vmt("restore", "--qmp", dsock, f"file:{missing}")
        assert result.returncode == 1
        line_ = one_error_line(result.stderr)
        assert "No such file" in line_ and line_.endswith(f"({UNTOUCHED})"), line_
        assert dst.status() == "inmigrate" and dst.query_migrate() == {}


def test_signal_while_the_monitor_is_silent(tmp_path: Path) -> None:
    """Before the hand-over a signal ends the command at once (nothing to undo), even
    while the image is already being read."""
    image = tmp_path / "x.img"
    image.write_bytes(b"\0" * (1 << 20))

    def silent(conn: socket.socket) -> None:
        time.sleep(8)

    with fake_monitor(silent) as path:
        proc = subprocess.Popen(
            [str(VMT), "restore", "--qmp", path, f"file:{image}"],
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - start < 3
    # (as restore --qmp said it before: nothing was rolled back, so no 128 + signal)
    assert proc.returncode == 1, err
    assert err == "vmtransport: error: interrupted by SIGTERM\n"


@pytest.mark.qemu
def test_signal_deferred_over_the_hand_over(
    qemu: str, tmp_path: Path, saved: Saved, own_signals: None
) -> None:
    """A signal that comes once QEMU has the pipe, before trio listens, is kept and
    raised again for trio: the restore unwinds (QEMU's load fails or had completed,
    the VM never runs) and says where it left QEMU."""
    outcome: list[str] = []
    with destination(qemu, tmp_path, bios=False) as (dst, dsock):
        early = prepare(dsock, f"file:{saved.image}")
        assert early.incoming and early.deferred and early.error is None
        os.kill(os.getpid(), signal.SIGTERM)  # noted, not raised
        with pytest.raises(Interrupted) as err:
            run_trio(lambda: resume_restore(early, report=outcome.append))
        assert err.value.signum == signal.SIGTERM
        assert outcome, "the unwind says where it left QEMU"
        assert "the VM never ran" in outcome[-1] or "QEMU's load completed" in outcome[-1]
        # QEMU's policy for a failed load: it exits; or it completed, paused.
        assert never_ran(dst) in ("exit 1", "paused", "prelaunch")


@pytest.mark.qemu
def test_in_process_fast_restore(
    qemu: str, tmp_path: Path, saved: Saved, own_signals: None
) -> None:
    """prepare() then resume_restore(): QEMU had the pipe before trio ran; the result
    is restore_vm's."""
    with destination(qemu, tmp_path, bios=False) as (dst, dsock):
        early = prepare(dsock, f"file:{saved.image}")
        assert early.incoming and early.r is None
        result = run_trio(lambda: resume_restore(early, state="paused"))
        assert result.bytes == saved.image.stat().st_size
        assert result.runstate == "prelaunch" and result.migration["status"] == "completed"
        assert dst.status() == "prelaunch"
        assert files_equal(saved.src_ram, dst.ram_file)


@pytest.mark.qemu
def test_no_trio_before_the_hand_over(qemu: str, tmp_path: Path, saved: Saved) -> None:
    """The point of it all: QEMU has the pipe before trio (or the trio QMP client, or
    the orchestration) is imported."""
    probe = (
        "import sys; from vmtransport._handoff import prepare; "
        "early = prepare(sys.argv[1], sys.argv[2]); "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'trio' "
        "or m in ('vmtransport.qmp._client', 'vmtransport._orchestration', "
        "'vmtransport._restore_vm')); "
        "print(early.incoming, heavy); "
        "import threading; ended = threading.Event(); "
        "early.running.when_done(ended.set); ended.wait(60)"
    )
    with destination(qemu, tmp_path, bios=False) as (dst, dsock):
        result = subprocess.run(
            [sys.executable, "-c", probe, dsock, f"file:{saved.image}"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert (result.returncode, result.stdout) == (0, "True []\n"), result.stderr
        # The whole stream went out (nobody finished the restore): loaded, not run.
        assert never_ran(dst) == "prelaunch"
