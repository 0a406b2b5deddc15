"""vmtransport.qmp: the trio QMP client.

Against real QEMU 7.2 and 10.0 (a second ``-qmp`` monitor beside the harness's own,
which cross-checks what the client did), and against a scripted fake monitor on a
socketpair for what QEMU never does: garbage, endless lines, EOF mid-reply, replies
nobody asked for, a peer that never greets.
"""

from __future__ import annotations

import array
import json
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from qemuvm import VM

import vmtransport
from vmtransport import qmp
from vmtransport.qmp._protocol import Protocol, ProtocolViolation, Reply

MIB = 1 << 20
GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "fake"},
        "capabilities": ["oob"],
    }
}


# --- real QEMU --------------------------------------------------------------------------


@contextmanager
def vm_with_monitor(qemu: str, tmp: Path, *, paused: bool = True) -> Iterator[tuple[VM, str]]:
    """A VM with a second QMP socket for the client under test (QEMU serves one client
    per monitor; the harness holds the first)."""
    sockdir = Path(os.environ.get("TMPDIR", "/tmp"))
    path = str(sockdir / f"vmt-qmp-{os.getpid()}-{time.monotonic_ns()}.sock")
    try:
        with VM(
            qemu, tmp, paused=paused, extra_args=["-qmp", f"unix:{path},server=on,wait=off"]
        ) as vm:
            yield vm, path
    finally:
        Path(path).unlink(missing_ok=True)


def qemu_fds(pid: int) -> dict[int, str]:
    """QEMU's open descriptors: number -> what /proc says they are."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


def pipe_link(fd: int) -> str:
    return f"pipe:[{os.fstat(fd).st_ino}]"


@pytest.mark.qemu
async def test_greeting_and_queries(qemu: str, tmp_path: Path) -> None:
    with trio.fail_after(60), vm_with_monitor(qemu, tmp_path) as (vm, path):
        async with await qmp.connect(path) as monitor:
            assert monitor.greeting is not None
            qemu_version = vm.cmd("query-version")["qemu"]
            assert monitor.greeting.version == (
                qemu_version["major"],
                qemu_version["minor"],
                qemu_version["micro"],
            )
            assert monitor.greeting.version[:2] in {(7, 2), (10, 0)}
            assert monitor.monitor == path
            status = await monitor.execute("query-status")
            assert status["status"] == "prelaunch" and status["running"] is False
            migrate = await monitor.execute("query-migrate")
            assert migrate == {} or migrate.get("status") == "none", migrate
        assert monitor.closed
        with pytest.raises(qmp.QMPConnectionError, match="connection closed"):
            await monitor.execute("query-status")


@pytest.mark.qemu
async def test_already_connected_socket(qemu: str, tmp_path: Path) -> None:
    with trio.fail_after(60), vm_with_monitor(qemu, tmp_path) as (_vm, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        async with await qmp.connect(sock, name="vm1") as monitor:
            assert (await monitor.execute("query-name")) == {}
            with pytest.raises(qmp.QMPError, match=r"^QMP monitor vm1: "):
                await monitor.execute("no-such-command")
        assert sock.fileno() == -1  # the client owned it and closed it


@pytest.mark.qemu
async def test_error_reply(qemu: str, tmp_path: Path) -> None:
    with trio.fail_after(60), vm_with_monitor(qemu, tmp_path) as (_vm, path):
        async with await qmp.connect(path) as monitor:
            with pytest.raises(qmp.QMPError) as err:
                await monitor.execute("no-such-command", {"x": 1})
            e = err.value
            assert isinstance(e, vmtransport.VMTransportError)
            assert e.error_class == "CommandNotFound"
            assert e.desc == "The command no-such-command has not been found"
            assert e.command == "no-such-command" and e.monitor == path
            assert str(e) == (
                f"QMP monitor {path}: no-such-command failed: CommandNotFound: "
                "The command no-such-command has not been found"
            )
            with pytest.raises(qmp.QMPError) as err:
                await monitor.execute("migrate-incoming", {"uri": "fd:x"})
            assert err.value.error_class == "GenericError"
            # An error reply leaves the connection usable.
            assert (await monitor.execute("query-status"))["status"] == "prelaunch"


@pytest.mark.qemu
async def test_getfd_passes_a_real_pipe(qemu: str, tmp_path: Path) -> None:
    with trio.fail_after(60), vm_with_monitor(qemu, tmp_path) as (vm, path):
        r, w = os.pipe()
        try:
            async with await qmp.connect(path) as monitor:
                assert pipe_link(w) not in qemu_fds(vm.pid).values()
                await monitor.getfd(w, "mig")
                assert pipe_link(w) in qemu_fds(vm.pid).values()
                # Descriptor names start with a letter: QEMU says so.
                with pytest.raises(qmp.QMPError, match="GenericError"):
                    await monitor.getfd(w, "1bad")
                await monitor.closefd("mig")
                assert pipe_link(w) not in qemu_fds(vm.pid).values()
                with pytest.raises(qmp.QMPError, match="mig"):
                    await monitor.closefd("mig")
        finally:
            os.close(r)
            os.close(w)


@pytest.mark.qemu
async def test_fdsets(qemu: str, tmp_path: Path) -> None:
    # Running, not paused: QEMU 7.2 closes a removed fd only while the VM runs.
    with trio.fail_after(60), vm_with_monitor(qemu, tmp_path, paused=False) as (vm, path):
        r, w = os.pipe()
        try:
            async with await qmp.connect(path) as monitor:
                added = await monitor.add_fd(r, opaque="read end")
                assert added.path == f"/dev/fdset/{added.fdset_id}"
                second = await monitor.add_fd(w, fdset_id=added.fdset_id)
                assert second.fdset_id == added.fdset_id and second.fd != added.fd
                assert qemu_fds(vm.pid).get(added.fd) == pipe_link(r)
                assert qemu_fds(vm.pid).get(second.fd) == pipe_link(w)
                sets = await monitor.execute("query-fdsets")
                (fdset,) = [s for s in sets if s["fdset-id"] == added.fdset_id]
                assert {f["fd"]: f.get("opaque") for f in fdset["fds"]} == {
                    added.fd: "read end",
                    second.fd: None,
                }
                await monitor.remove_fd(added.fdset_id, added.fd)
                await monitor.remove_fd(added.fdset_id)
                assert added.fd not in qemu_fds(vm.pid)
                assert second.fd not in qemu_fds(vm.pid)
                sets = await monitor.execute("query-fdsets")
                assert all(s["fdset-id"] != added.fdset_id for s in sets), sets
                with pytest.raises(qmp.QMPError, match="GenericError"):
                    await monitor.remove_fd(added.fdset_id, added.fd)
        finally:
            os.close(r)
            os.close(w)


@pytest.mark.qemu
async def test_events_while_commands_run(qemu: str, tmp_path: Path) -> None:
    with trio.fail_after(60), vm_with_monitor(qemu, tmp_path) as (vm, path):
        async with await qmp.connect(path) as monitor:
            seen: list[str] = []
            statuses: list[str] = []

            async def watch(listener: qmp.EventListener) -> None:
                async for event in listener:
                    seen.append(event.name)
                    if len(seen) == 6:
                        return

            async def query(n: int) -> None:
                for _ in range(n):
                    statuses.append((await monitor.execute("query-status"))["status"])
                    await monitor.execute("query-migrate")

            with monitor.listen("STOP", "RESUME") as listener:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch, listener)  # a task reads only events
                    nursery.start_soon(query, 30)  # commands run meanwhile
                    for _ in range(3):
                        await monitor.execute("cont")
                        await monitor.execute("stop")
                assert listener.dropped == 0
            assert seen == ["RESUME", "STOP"] * 3
            assert len(statuses) == 30
            assert set(statuses) <= {"prelaunch", "running", "paused"}
            assert vm.status() == "paused"


@pytest.mark.qemu
async def test_concurrent_commands_get_their_own_replies(qemu: str, tmp_path: Path) -> None:
    with trio.fail_after(60), vm_with_monitor(qemu, tmp_path) as (_vm, path):
        async with await qmp.connect(path) as monitor:
            results: dict[int, Any] = {}

            async def one(i: int) -> None:
                if i % 3 == 0:
                    results[i] = await monitor.execute("query-status")
                elif i % 3 == 1:
                    results[i] = await monitor.execute(
                        "qom-get", {"path": "/machine", "property": "type"}
                    )
                else:
                    try:
                        await monitor.execute(f"no-such-{i}")
                    except qmp.QMPError as e:
                        results[i] = e.desc

            async with trio.open_nursery() as nursery:
                for i in range(60):
                    nursery.start_soon(one, i)
            for i, value in results.items():
                if i % 3 == 0:
                    assert value["status"] == "prelaunch"
                elif i % 3 == 1:
                    assert value.startswith("pc-i440fx-")
                else:
                    assert value == f"The command no-such-{i} has not been found"
            assert len(results) == 60


@pytest.mark.qemu
@pytest.mark.fault(
    "QMP: a real QEMU monitor that never greets (another client holds it)",
    direction="qmp",
    vm="the VM untouched",
    disk="n/a",
    exit="QMPConnectionError raised (the CLI: exit 1)",
    message="'no greeting' within the deadline",
)
async def test_busy_monitor_never_greets(qemu: str, tmp_path: Path) -> None:
    # QEMU serves one client per monitor: the harness holds the first socket, so a
    # second client is accepted by the kernel and then hears nothing.
    with trio.fail_after(60), vm_with_monitor(qemu, tmp_path) as (vm, _):
        start = time.monotonic()
        with pytest.raises(qmp.QMPConnectionError) as err:
            await qmp.connect(vm.qmp_path, timeout=1.0)
        assert time.monotonic() - start < 3
        assert str(err.value) == f"QMP monitor {vm.qmp_path}: sent no QMP greeting within 1 s"


# --- paths that are no monitor ------------------------------------------------------------


@pytest.mark.fault(
    "QMP: a plain file given as the monitor",
    direction="qmp",
    vm="n/a",
    disk="n/a",
    exit="QMPConnectionError raised (the CLI: exit 1)",
    message="names the path: not a socket",
)
async def test_plain_file_is_no_monitor(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    path.write_text("{}\n")
    with trio.fail_after(10), pytest.raises(qmp.QMPConnectionError) as err:
        await qmp.connect(path)
    assert str(err.value) == f"QMP monitor {path}: not a socket (a regular file)"


@pytest.mark.fault(
    "QMP: a directory, a FIFO or a missing path given as the monitor",
    direction="qmp",
    vm="n/a",
    disk="n/a",
    exit="QMPConnectionError raised (the CLI: exit 1)",
    message="names the path and why",
)
async def test_directory_fifo_and_missing_path(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {
        tmp_path: "not a socket (a directory)",
        fifo: "not a socket (a FIFO)",
        tmp_path / "missing": "No such file or directory",
    }
    for path, reason in cases.items():
        with trio.fail_after(10), pytest.raises(qmp.QMPConnectionError) as err:
            await qmp.connect(path)
        assert str(err.value) == f"QMP monitor {path}: {reason}"


@pytest.mark.fault(
    "QMP: a monitor socket nobody listens on",
    direction="qmp",
    vm="n/a",
    disk="n/a",
    exit="QMPConnectionError raised (the CLI: exit 1)",
    message="names the socket: connection refused",
)
async def test_socket_nobody_listens_on(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))  # bound, never listening: what a QEMU that died leaves
    sock.close()
    assert stat.S_ISSOCK(path.stat().st_mode)
    with trio.fail_after(10), pytest.raises(qmp.QMPConnectionError) as err:
        await qmp.connect(path)
    assert str(err.value) == (
        f"QMP monitor {path}: cannot connect: Connection refused "
        "(nothing listens on it: is QEMU running?)"
    )


async def test_long_socket_path(tmp_path: Path) -> None:
    # sun_path holds 107 bytes; the client connects through /proc/self/fd instead.
    deep = tmp_path / ("d" * 100) / ("e" * 100)
    deep.mkdir(parents=True)
    path = deep / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX)
    dirfd = os.open(deep, os.O_PATH)
    try:
        listener.bind(f"/proc/self/fd/{dirfd}/qmp.sock")
    finally:
        os.close(dirfd)
    listener.listen(1)
    with listener, trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                conn, _ = await trio.to_thread.run_sync(listener.accept)
                with trio.socket.from_stdlib_socket(conn) as server_end:
                    fake = Fake(server_end)
                    await fake.handshake()
                    await fake.reply_next({"status": "running"})

            nursery.start_soon(serve)
            async with await qmp.connect(path) as monitor:
                assert (await monitor.execute("query-status")) == {"status": "running"}


@pytest.mark.fault(
    "QMP: a peer that accepts and never greets",
    direction="qmp",
    vm="n/a (a fake monitor)",
    disk="n/a",
    exit="QMPConnectionError raised (the CLI: exit 1)",
    message="'no greeting' within the deadline",
)
async def test_peer_that_never_greets(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        start = time.monotonic()
        with trio.fail_after(10), pytest.raises(qmp.QMPConnectionError) as err:
            await qmp.connect(path, timeout=0.5)
        assert time.monotonic() - start < 2
    assert str(err.value) == f"QMP monitor {path}: sent no QMP greeting within 0.5 s"


# --- a scripted fake monitor ---------------------------------------------------------------


class Fake:
    """The monitor's end of a socketpair, scripted by the test."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = b""
        self.sent = 0

    async def send(self, data: bytes | dict[str, Any]) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode() + b"\r\n"  # QEMU ends lines with CRLF
        view = memoryview(data)
        while view:
            n = await self.sock.send(view)
            self.sent += n
            view = view[n:]

    async def command(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = await self.sock.recv(65536)
            assert data, "the client closed the connection"
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def command_with_fds(self) -> tuple[dict[str, Any], list[int]]:
        assert self.buf == b""
        data, ancillary, _, _ = await self.sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
        fds = array.array("i")
        for level, kind, payload in ancillary:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        self.buf = data
        return await self.command(), list(fds)

    async def reply(self, cmd: dict[str, Any], value: Any = None) -> None:
        await self.send({"return": {} if value is None else value, "id": cmd["id"]})

    async def reply_next(self, value: Any = None) -> dict[str, Any]:
        cmd = await self.command()
        await self.reply(cmd, value)
        return cmd

    async def event(self, name: str, **data: Any) -> None:
        stamp = {"seconds": 1700000000, "microseconds": 250000}
        await self.send({"event": name, "data": data, "timestamp": stamp})

    async def handshake(self) -> None:
        await self.send(GREETING)
        cmd = await self.reply_next()
        assert cmd["execute"] == "qmp_capabilities"


@asynccontextmanager
async def fake_monitor(**kwargs: Any) -> AsyncIterator[tuple[qmp.QMPClient, Fake]]:
    """A client connected to a Fake that has greeted and negotiated."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fake = Fake(trio.socket.from_stdlib_socket(theirs))
    with fake.sock, trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake.handshake)
            client = await qmp.connect(ours, name="fake", **kwargs)
        async with client:
            yield client, fake


async def test_fake_monitor_round_trip() -> None:
    async with fake_monitor() as (client, fake), trio.open_nursery() as nursery:
        assert client.greeting == qmp.Greeting((10, 0, 2), "fake", ("oob",))
        nursery.start_soon(fake.reply_next, {"status": "running"})
        assert (await client.execute("query-status")) == {"status": "running"}


@pytest.mark.fault(
    "QMP: a monitor that sends bad JSON",
    direction="qmp",
    vm="n/a (a fake monitor)",
    disk="n/a",
    exit="QMPConnectionError raised (the CLI: exit 1)",
    message="'not JSON', naming the socket",
)
async def test_bad_json() -> None:
    async with fake_monitor() as (client, fake):
        async with trio.open_nursery() as nursery:

            async def script() -> None:
                await fake.command()
                await fake.send(b'{"return": {}, "id": 2,,}\r\n')

            nursery.start_soon(script)
            with pytest.raises(qmp.QMPConnectionError) as err:
                await client.execute("query-status")
        assert str(err.value).startswith("QMP monitor fake: sent a line that is not JSON (")
        assert client.closed
        with pytest.raises(qmp.QMPConnectionError, match="not JSON"):
            await client.execute("query-status")  # broken for good, still clear


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"[1, 2]", "sent JSON that is not an object: [1, 2]"),
        (b'{"hello": 1}', "sent a message that is neither reply nor event: {'hello': 1}"),
        (b'{"return": {}}', "sent a reply without a command id: {'return': {}}"),
        (b'{"error": "x", "id": 2}', "sent a malformed error reply: {'error': 'x', 'id': 2}"),
        (
            b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}',
            "sent an error for no command of ours: GenericError: JSON parse error",
        ),
        (b'{"event": 5}', "sent a malformed event: {'event': 5}"),
        (b"\xff\xfe{}", "sent a line that is not JSON ("),
    ],
)
@pytest.mark.fault(
    "QMP: a monitor that sends JSON that is not QMP",
    direction="qmp",
    vm="n/a (a fake monitor)",
    disk="n/a",
    exit="QMPConnectionError raised (the CLI: exit 1)",
    message="says what the message lacks",
)
async def test_messages_that_are_not_qmp(line: bytes, reason: str) -> None:
    async with fake_monitor() as (client, fake), trio.open_nursery() as nursery:

        async def script() -> None:
            await fake.command()
            await fake.send(line + b"\n")

        nursery.start_soon(script)
        with pytest.raises(qmp.QMPConnectionError) as err:
            await client.execute("query-status")
        assert str(err.value).startswith(f"QMP monitor fake: {reason}")


@pytest.mark.fault(
    "QMP: a monitor that sends a line of 100 MiB",
    direction="qmp",
    vm="n/a (a fake monitor)",
    disk="n/a",
    exit="QMPConnectionError raised (the CLI: exit 1)",
    message="'longer than N bytes', without reading it all",
)
async def test_line_of_100_mib_is_refused_without_reading_it_all() -> None:
    bound = qmp.MAX_LINE
    assert bound == 16 * MIB
    async with fake_monitor() as (client, fake), trio.open_nursery() as nursery:
        chunk = b"x" * MIB

        async def script() -> None:
            await fake.command()
            await fake.send(b'{"return": "')
            for _ in range(100):
                await fake.send(chunk)  # blocks once the client stops reading
            await fake.send(b'", "id": 2}\n')

        nursery.start_soon(script)
        with pytest.raises(qmp.QMPConnectionError) as err:
            await client.execute("query-status")
        assert str(err.value) == (
            f"QMP monitor fake: sent a line longer than {bound} bytes without its end"
        )
        # The client stopped reading right after the bound: the rest is still unsent.
        assert fake.sent < bound + 8 * MIB
        nursery.cancel_scope.cancel()


async def test_a_smaller_line_bound() -> None:
    async with fake_monitor(max_line=1000) as (client, fake), trio.open_nursery() as nursery:

        async def script() -> None:
            await fake.reply_next("y" * 900)
            await fake.reply_next("y" * 1000)

        nursery.start_soon(script)
        assert await client.execute("a") == "y" * 900
        with pytest.raises(qmp.QMPConnectionError, match="longer than 1000 bytes"):
            await client.execute("b")


@pytest.mark.fault(
    "QMP: a monitor that closes mid-reply",
    direction="qmp",
    vm="n/a (a fake monitor)",
    disk="n/a",
    exit="QMPConnectionError raised (the CLI: exit 1)",
    message="the monitor closed the connection",
)
async def test_eof_mid_reply() -> None:
    async with fake_monitor() as (client, fake), trio.open_nursery() as nursery:
        half = b'{"return": {"status": "running"}, "i'

        async def script() -> None:
            await fake.command()
            await fake.send(half)
            fake.sock.shutdown(socket.SHUT_WR)

        nursery.start_soon(script)
        with pytest.raises(qmp.QMPConnectionError) as err:
            await client.execute("query-status")
        assert str(err.value) == (
            "QMP monitor fake: closed the connection in the middle of a message "
            f"({len(half)} bytes)"
        )


async def test_eof_between_messages() -> None:
    async with fake_monitor() as (client, fake), trio.open_nursery() as nursery:

        async def script() -> None:
            await fake.command()
            fake.sock.shutdown(socket.SHUT_WR)

        nursery.start_soon(script)
        with pytest.raises(qmp.QMPConnectionError) as err:
            await client.execute("quit")
        assert str(err.value) == "QMP monitor fake: closed the connection"


async def test_eof_before_greeting() -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    with trio.fail_after(10), pytest.raises(qmp.QMPConnectionError) as err:
        await qmp.connect(ours, name="fake")
    assert str(err.value) == "QMP monitor fake: closed the connection without a greeting"
    assert ours.fileno() == -1


async def test_greeting_that_is_not_qmp() -> None:
    ours, theirs = socket.socketpair()
    with theirs, trio.fail_after(10):
        theirs.sendall(b'{"return": {}}\n')
        with pytest.raises(qmp.QMPConnectionError) as err:
            await qmp.connect(ours, name="fake")
    assert str(err.value) == (
        "QMP monitor fake: did not greet with a QMP banner but sent {'return': {}}"
    )


@pytest.mark.fault(
    "QMP: a reply with an id never sent",
    direction="qmp",
    vm="n/a (a fake monitor)",
    disk="n/a",
    exit="QMPConnectionError raised (the CLI: exit 1)",
    message="names the unknown id",
)
async def test_reply_with_unknown_id() -> None:
    async with fake_monitor() as (client, fake), trio.open_nursery() as nursery:

        async def script() -> None:
            await fake.command()
            await fake.send({"return": {}, "id": 999})

        nursery.start_soon(script)
        with pytest.raises(qmp.QMPConnectionError) as err:
            await client.execute("query-status")
        assert str(err.value) == "QMP monitor fake: sent a reply to command id 999, never sent"


async def test_events_interleaved_with_replies() -> None:
    async with fake_monitor() as (client, fake):
        results: dict[str, Any] = {}

        async def run(name: str) -> None:
            results[name] = await client.execute(name)

        async def script() -> None:
            first = await fake.command()
            second = await fake.command()
            await fake.event("STOP")
            await fake.reply(second, "two")
            await fake.event("MIGRATION", status="active")
            await fake.event("IGNORED")
            await fake.reply(first, "one")
            await fake.event("RESUME")

        with client.listen("STOP", "RESUME", "MIGRATION") as listener:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(script)
                nursery.start_soon(run, "first")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(run, "second")
            assert results == {"first": "one", "second": "two"}
            events = [await listener.receive() for _ in range(3)]
        assert [e.name for e in events] == ["STOP", "MIGRATION", "RESUME"]
        assert events[1].data == {"status": "active"}
        assert events[0].timestamp == 1700000000.25


async def test_listener_waits_while_no_command_runs() -> None:
    async with fake_monitor() as (client, fake), trio.open_nursery() as nursery:
        with client.listen() as everything, client.listen("B") as only_b:
            nursery.start_soon(fake.event, "A")
            nursery.start_soon(fake.event, "B")
            assert (await everything.receive()).name in {"A", "B"}
            assert (await everything.receive()).name in {"A", "B"}
            assert (await only_b.receive()).name == "B"
            assert only_b.get_nowait() is None


async def test_full_listener_drops_the_oldest() -> None:
    async with fake_monitor() as (client, fake), trio.open_nursery() as nursery:

        async def script() -> None:
            cmd = await fake.command()
            for i in range(5):
                await fake.event("E", n=i)
            await fake.reply(cmd)

        nursery.start_soon(script)
        with client.listen("E", buffer=2) as listener:
            await client.execute("x")  # reads all five events; nobody takes them
            assert listener.dropped == 3
            assert [(await listener.receive()).data["n"] for _ in range(2)] == [3, 4]


async def test_listener_raises_after_queued_events_when_broken() -> None:
    async with fake_monitor() as (client, fake):
        with client.listen() as listener:
            await fake.event("LAST")
            fake.sock.shutdown(socket.SHUT_WR)
            assert (await listener.receive()).name == "LAST"
            with pytest.raises(qmp.QMPConnectionError, match="closed the connection"):
                await listener.receive()


async def test_listener_ends_when_client_closes() -> None:
    async with fake_monitor() as (client, _fake):
        listener = client.listen()
        got: list[qmp.Event] = []

        async def drain() -> None:
            got.extend([event async for event in listener])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()
        assert got == []


@pytest.mark.fault(
    "QMP: a monitor that stalls",
    direction="qmp",
    vm="n/a (a fake monitor)",
    disk="n/a",
    exit="QMPConnectionError raised (the CLI: exit 1)",
    message="no reply within the deadline; a late reply is dropped",
)
async def test_stalled_monitor_times_out_and_late_reply_is_dropped() -> None:
    async with fake_monitor() as (client, fake), trio.open_nursery() as nursery:
        start = time.monotonic()
        stalled: list[dict[str, Any]] = []
        timed_out = trio.Event()

        async def script() -> None:
            stalled.append(await fake.command())
            await timed_out.wait()
            await fake.reply(stalled[0], "late")
            await fake.reply_next("fresh")

        nursery.start_soon(script)
        with pytest.raises(qmp.QMPConnectionError) as err:
            await client.execute("stop", timeout=0.3)
        assert str(err.value) == "QMP monitor fake: no reply to stop within 0.3 s"
        assert 0.3 <= time.monotonic() - start < 2
        timed_out.set()
        # The late reply is dropped; the connection stays usable.
        assert await client.execute("query-status") == "fresh"
        assert not client.closed


async def test_cancelled_read_loses_nothing() -> None:
    async with fake_monitor() as (client, fake), trio.open_nursery() as nursery:
        cancelled = trio.Event()

        async def script() -> None:
            slow = await fake.command()
            await fake.send(b'{"event": "HALF"')  # the client reads half an event...
            await cancelled.wait()  # ...and is cancelled waiting for the rest
            await fake.send(b', "data": {}}\n')
            await fake.reply(slow, "late")
            await fake.reply_next(7)

        nursery.start_soon(script)
        with client.listen() as listener:
            with trio.move_on_after(0.3):
                await client.execute("slow")
            cancelled.set()
            assert await client.execute("next") == 7
            assert (await listener.receive()).name == "HALF"
            assert listener.get_nowait() is None


async def test_descriptors_travel_with_their_command() -> None:
    async with fake_monitor() as (client, fake), trio.open_nursery() as nursery:
        r, w = os.pipe()
        received: list[tuple[dict[str, Any], list[int]]] = []

        async def script() -> None:
            for _ in range(2):
                cmd, fds = await fake.command_with_fds()
                received.append((cmd, fds))
                value = {"fdset-id": 3, "fd": 40} if cmd["execute"] == "add-fd" else {}
                await fake.reply(cmd, value)

        try:
            nursery.start_soon(script)
            await client.getfd(w, "mig")
            added = await client.add_fd(r, fdset_id=3, opaque="o")
            assert (added.fdset_id, added.fd, added.path) == (3, 40, "/dev/fdset/3")
            (getfd, (fd1,)), (addfd, (fd2,)) = received
            assert getfd["execute"] == "getfd" and getfd["arguments"] == {"fdname": "mig"}
            assert addfd["arguments"] == {"fdset-id": 3, "opaque": "o"}
            # The monitor got duplicates of our pipe's ends: what it writes, we read.
            os.write(fd1, b"hello")
            assert os.read(r, 5) == b"hello"
            assert os.fstat(fd2).st_ino == os.fstat(r).st_ino
            os.close(fd1)
            os.close(fd2)
        finally:
            os.close(r)
            os.close(w)


async def test_descriptors_need_a_unix_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        tcp = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with peer, trio.fail_after(10):
            peer.sendall(json.dumps(GREETING).encode() + b"\n" + b'{"return": {}, "id": 1}\n')
            async with await qmp.connect(tcp) as client:
                assert client.monitor.startswith("socket fd ")
                r, w = os.pipe()
                os.close(r)
                try:
                    with pytest.raises(ValueError, match="only pass over a UNIX socket"):
                        await client.getfd(w, "x")
                finally:
                    os.close(w)


def test_top_level_exports() -> None:
    assert vmtransport.QMPError is qmp.QMPError
    assert vmtransport.QMPConnectionError is qmp.QMPConnectionError
    assert issubclass(qmp.QMPConnectionError, vmtransport.VMTransportError)


# --- the sans-io protocol, without sockets -------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


@given(
    st.lists(st.tuples(st.booleans(), _json), min_size=1, max_size=12),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=30),
)
def test_protocol_reassembles_messages_split_anywhere(
    messages: list[tuple[bool, Any]], cuts: list[int]
) -> None:
    proto = Protocol()
    proto.feed(json.dumps(GREETING).encode() + b"\r\n")
    assert proto.next_message() == qmp.Greeting((10, 0, 2), "fake", ("oob",))
    wire = b""
    expected: list[object] = []
    for is_event, value in messages:
        payload: dict[str, Any]
        if is_event:
            payload = {"event": "E", "data": {"v": value}}
            expected.append(qmp.Event("E", {"v": value}))
        else:
            cmd_id, _ = proto.command("x")
            payload = {"return": value, "id": cmd_id}
            expected.append(Reply(cmd_id, value))
        wire += json.dumps(payload).encode() + b"\n"
    got: list[object] = []
    pos = 0
    for cut in [*cuts, len(wire)]:
        proto.feed(wire[pos : pos + cut])
        pos += cut
        while (msg := proto.next_message()) is not None:
            got.append(msg)
        if pos >= len(wire):
            break
    proto.feed(wire[pos:])
    while (msg := proto.next_message()) is not None:
        got.append(msg)
    assert got == expected


@given(st.integers(min_value=1, max_value=300), st.integers(min_value=1, max_value=50))
def test_protocol_line_bound_holds_however_the_bytes_come(bound: int, chunk: int) -> None:
    proto = Protocol(max_line=bound)
    proto.feed(json.dumps(GREETING).encode().ljust(bound, b" ")[:bound] + b"\n")
    if len(json.dumps(GREETING)) > bound:
        with pytest.raises(ProtocolViolation):
            proto.next_message()
        return
    assert isinstance(proto.next_message(), qmp.Greeting)
    fed = 0
    with pytest.raises(ProtocolViolation, match=f"longer than {bound} bytes"):
        while True:
            proto.feed(b"x" * chunk)
            fed += chunk
            assert proto.next_message() is None
    assert fed <= bound + chunk  # refused as soon as the bound is passed


def test_protocol_late_and_unknown_replies() -> None:
    proto = Protocol()
    proto.feed(json.dumps(GREETING).encode() + b"\n")
    proto.next_message()
    first, _ = proto.command("a")
    second, _ = proto.command("b")
    proto.abandon(first)
    proto.feed(f'{{"return": 1, "id": {first}}}\n{{"return": 2, "id": {second}}}\n'.encode())
    assert proto.next_message() == Reply(second, 2)  # the abandoned one's reply is skipped
    proto.feed(f'{{"return": 1, "id": {first}}}\n'.encode())  # a second reply: unknown now
    with pytest.raises(ProtocolViolation, match=f"command id {first}, never sent"):
        proto.next_message()
