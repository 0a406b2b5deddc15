"""The conformance suite (vmtransport.testing) on every built-in transport, on real files,
FIFOs, pipes, /dev/full, a 1 MiB tmpfs (as root) and shell commands; and on deliberately
broken transports, each of which must fail the check it breaks with a message that says
what is wrong.

The large input is 64 MiB here; ``VMTRANSPORT_CONFORMANCE_SIZE=4G pytest
tests/test_conformance.py -k roundtrip`` runs the multi-GiB shape.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

import vmtransport
from vmtransport import Registry, Sink, Source, ThreadedSource, Transport, TransportError
from vmtransport.testing import (
    CHECKS,
    Channel,
    ConformanceFailure,
    Feed,
    NotApplicable,
    PathFactory,
    TransportFactory,
    Workspace,
    check_transport,
    fifo_feed,
    run_check,
)

MIB = 1 << 20


def own_fd(ws: Workspace, fd: int) -> int:
    """Close ``fd`` when the check ends, unless the transport closed it already (the
    number may then name another descriptor: compared by inode)."""
    st = os.fstat(fd)

    def close() -> None:
        try:
            now = os.fstat(fd)
        except OSError:
            return
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.close(fd)

    ws.defer(close)
    return fd


class PipeFdFactory(TransportFactory):
    """``fd:`` on a pipe: the sink's far end is read while it writes."""

    name = "fd: (pipe)"

    def channel(self, ws: Workspace) -> Channel:
        r, w = os.pipe()
        return Channel(f"fd:{own_fd(ws, w)}", f"fd:{own_fd(ws, r)}", concurrent=True)

    def missing_target(self, ws: Workspace) -> str:
        return "fd:1000000"  # no descriptor has that number

    def full_target(self, ws: Workspace) -> str:
        return f"fd:{own_fd(ws, os.open('/dev/full', os.O_WRONLY | os.O_CLOEXEC))}"

    def missing_source(self, ws: Workspace) -> str:
        return "fd:1000001"

    def stalled_source(self, ws: Workspace) -> Feed:
        r, w = os.pipe()
        own_fd(ws, w)
        return Feed(f"fd:{own_fd(ws, r)}", lambda: w)


class FileFdFactory(PipeFdFactory):
    """``fd:`` on a regular file: saved through one descriptor, read through another
    opened once the save committed."""

    name = "fd: (file)"

    def channel(self, ws: Workspace) -> Channel:
        path = ws.path / "stream.sav"
        w = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

        def source() -> str:
            return f"fd:{own_fd(ws, os.open(path, os.O_RDONLY | os.O_CLOEXEC))}"

        return Channel(f"fd:{own_fd(ws, w)}", source)


class ExecFactory(TransportFactory):
    """``exec:`` through cat; the save is made atomic by the command (``&& mv``)."""

    name = "exec:"

    def channel(self, ws: Workspace) -> Channel:
        final, part = ws.path / "stream.sav", ws.path / "stream.part"
        return Channel(
            f"exec:cat > '{part}' && mv '{part}' '{final}'",
            f"exec:cat '{final}'",
            looks_complete=final.exists,
        )

    def missing_target(self, ws: Workspace) -> str:
        return f"exec:cat > '{ws.path}/no-such-directory/stream.sav'"

    def full_target(self, ws: Workspace) -> str:
        return "exec:cat > /dev/full"

    def missing_source(self, ws: Workspace) -> str:
        return f"exec:cat '{ws.path}/no-such-file.sav'"

    def stalled_source(self, ws: Workspace) -> Feed:
        fifo = ws.path / "stalled.fifo"
        return fifo_feed(fifo, f"exec:cat '{fifo}'")


BUILTIN: dict[str, TransportFactory] = {
    "file": PathFactory("file:{path}"),
    "odirect": PathFactory("odirect:{path}"),
    "fd-pipe": PipeFdFactory(),
    "fd-file": FileFdFactory(),
    "exec": ExecFactory(),
}


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("transport", list(BUILTIN))
def test_builtin_transport_conforms(transport: str, check: str, tmp_path: Path) -> None:
    run_check(check, BUILTIN[transport], tmp_path)


def test_check_transport_reports_every_check(tmp_path: Path) -> None:
    report = check_transport(PathFactory("file:{path}"), tmp_path, size=MIB)
    assert report.passed == list(CHECKS)
    assert not report.failures and not report.skipped


def test_a_factory_without_failing_targets_skips(tmp_path: Path) -> None:
    class Minimal(TransportFactory):
        name = "minimal"

        def channel(self, ws: Workspace) -> Channel:
            return Channel(f"file:{ws.path}/s", f"file:{ws.path}/s")

    with pytest.raises(NotApplicable, match="no stalled source"):
        run_check("event-loop", Minimal(), tmp_path)
    report = check_transport(Minimal(), tmp_path / "all", size=MIB)
    assert set(report.skipped) == {"errors", "event-loop"}, report
    with pytest.raises(ValueError, match="unknown conformance check 'speed'"):
        run_check("speed", Minimal(), tmp_path)


# --- deliberately broken transports ---------------------------------------------------------


class Wrapper(Transport):
    """Passes everything on to the transport its target names (``NAME:file:/x``)."""

    raw_target = True

    def __init__(self, uri: vmtransport.URI) -> None:
        super().__init__(uri)
        self.inner = self.registry.resolve(uri.target)

    def open_sink(self) -> Sink:
        return self.inner.open_sink()

    async def open_source(self) -> Source:
        return await self.inner.open_source()


class PassSink(Sink):
    def __init__(self, inner: Sink) -> None:
        self.inner = inner

    def write(self, data: memoryview) -> None:
        self.inner.write(data)

    def commit(self) -> None:
        self.inner.commit()

    def abort(self) -> None:
        self.inner.abort()

    def cancel(self) -> None:
        self.inner.cancel()


class EarlyEndSource(Source):
    """Returns 0 once after its first read, as if the stream had ended, then goes on."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.reads = 0

    async def readinto(self, buf: memoryview) -> int:
        self.reads += 1
        if self.reads == 2:
            return 0
        return await self.inner.readinto(buf)

    async def commit(self) -> None:
        await self.inner.commit()

    async def abort(self) -> None:
        await self.inner.abort()


class EarlyEnd(Wrapper):
    scheme = "early-end"

    async def open_source(self) -> Source:
        return EarlyEndSource(await self.inner.open_source())


class DropByteSink(PassSink):
    """Loses the first byte of the stream."""

    first = True

    def write(self, data: memoryview) -> None:
        if self.first:
            self.first, data = False, data[1:]
        if data:
            self.inner.write(data)


class DropByte(Wrapper):
    scheme = "drop-byte"

    def open_sink(self) -> Sink:
        return DropByteSink(self.inner.open_sink())


class LoopBlockingSource(Source):
    """Reads a file (or FIFO) with blocking calls on the event loop."""

    def __init__(self, inner: ThreadedSource) -> None:
        self.inner = inner

    async def readinto(self, buf: memoryview) -> int:
        return self.inner.read_blocking(buf)

    async def commit(self) -> None:
        self.inner.close()

    async def abort(self) -> None:
        self.inner.close()


class BlocksLoop(Wrapper):
    scheme = "blocks-loop"

    async def open_source(self) -> Source:
        threaded = self.inner.open_threaded_source()  # blocks on a FIFO with no writer
        assert threaded is not None
        return LoopBlockingSource(threaded)


class BareOSError(Wrapper):
    """Lets the OS's errors out as they are."""

    scheme = "bare-oserror"

    def open_sink(self) -> Sink:
        path = self.inner.uri.target
        os.stat(os.path.dirname(path))  # FileNotFoundError, not a TransportError
        return self.inner.open_sink()

    async def open_source(self) -> Source:
        os.stat(self.inner.uri.target)
        return await self.inner.open_source()


class NamelessErrorSink(PassSink):
    def write(self, data: memoryview) -> None:
        try:
            self.inner.write(data)
        except TransportError as exc:
            raise TransportError("write failed: No space left on device") from exc


class NamelessError(Wrapper):
    """Raises the package's error, but without the URI."""

    scheme = "nameless-error"

    def open_sink(self) -> Sink:
        try:
            return NamelessErrorSink(self.inner.open_sink())
        except TransportError as exc:
            raise TransportError("cannot save: no such directory") from exc


class HoardingSink(PassSink):
    """Keeps the whole stream in memory and writes it at commit: no back-pressure."""

    def __init__(self, inner: Sink) -> None:
        super().__init__(inner)
        self.held: list[bytes] = []

    def write(self, data: memoryview) -> None:
        self.held.append(bytes(data))

    def commit(self) -> None:
        for chunk in self.held:
            self.inner.write(memoryview(chunk))
        self.held.clear()
        self.inner.commit()


class Hoarding(Wrapper):
    scheme = "hoarding"

    def open_sink(self) -> Sink:
        return HoardingSink(self.inner.open_sink())


class CommitOnAbortSink(PassSink):
    """Keeps what it got on abort, under the final name."""

    def abort(self) -> None:
        self.inner.commit()

    def cancel(self) -> None:
        pass


class CommitOnAbort(Wrapper):
    scheme = "commit-on-abort"

    def open_sink(self) -> Sink:
        return CommitOnAbortSink(self.inner.open_sink())


class BrokenPlugin:
    @vmtransport.hookimpl
    def vmtransport_transports(self) -> Sequence[type[Transport]]:
        return [EarlyEnd, DropByte, BlocksLoop, BareOSError, NamelessError, Hoarding, CommitOnAbort]


BROKEN = Registry(entry_points=False, extra=(BrokenPlugin(),))

#: scheme -> (the check it fails, what its message must say)
FAILS: dict[str, tuple[str, str]] = {
    "early-end": (
        "roundtrip",
        r"check 'roundtrip', input odd-sized \(buffers and a page and a byte\): "
        r"readinto\(\) returned 0 \(end of stream\) after 1048576 of the 16781313 bytes "
        r"saved: bytes were lost, or the source says the stream ended before it did",
    ),
    "drop-byte": (
        "roundtrip",
        r"check 'roundtrip', input tiny \(1 byte\): readinto\(\) returned 0 \(end of "
        r"stream\) after 0 of the 1 bytes saved",
    ),
    "blocks-loop": (
        "event-loop",
        r"check 'event-loop', input a source that stalls 1 s at open and mid-stream: the "
        r"trio event loop was blocked for \d\.\d\d s",
    ),
    "bare-oserror": (
        "errors",
        r"check 'errors', input a target whose directory does not exist: expected a "
        r"vmtransport.TransportError naming '.*', got builtins.FileNotFoundError",
    ),
    "nameless-error": (
        "errors",
        r"check 'errors', input a target whose directory does not exist: the error does "
        r"not name the URI '.*': TransportError: cannot save: no such directory",
    ),
    "hoarding": (
        "back-pressure",
        r"check 'back-pressure', input 96.00 MiB with a slow consumer: resident memory "
        r"grew by \d+\.\d\d MiB while saving \(bound: 32.00 MiB",
    ),
    "commit-on-abort": (
        "cancel",
        r"check 'cancel', input a save cancelled after 4 MiB: after the cancel, the "
        r"target looks complete",
    ),
}


@pytest.mark.parametrize("scheme", list(FAILS))
def test_broken_transport_fails_with_a_message_saying_what(scheme: str, tmp_path: Path) -> None:
    check, message = FAILS[scheme]
    factory = PathFactory(f"{scheme}:file:{{path}}", registry=BROKEN)
    with pytest.raises(ConformanceFailure) as info:
        run_check(check, factory, tmp_path, size=MIB)
    text = str(info.value)
    assert text.startswith(f"[{scheme}:file:{{path}}] "), text
    assert re.search(message, text), text


def test_broken_transports_pass_the_checks_they_do_not_break(tmp_path: Path) -> None:
    """The failures above are each its transport's fault, not the suite's: a wrapper
    that breaks nothing passes everything."""
    for scheme in ("early-end", "blocks-loop", "bare-oserror", "nameless-error"):
        factory = PathFactory(f"{scheme}:file:{{path}}", registry=BROKEN)
        run_check("cancel", factory, tmp_path / scheme, size=MIB)
    run_check("roundtrip", PathFactory("hoarding:file:{path}", registry=BROKEN), tmp_path, size=MIB)


def test_the_suite_checks_its_own_pattern() -> None:
    """Every MiB of the generated stream differs, so a dropped or repeated MiB shows."""
    from vmtransport.testing import Pattern

    p = Pattern()
    assert p.bytes(0, MIB) != p.bytes(MIB, MIB)
    assert p.bytes(MIB - 3, 6) == p.bytes(MIB - 3, 3) + p.bytes(MIB, 3)
    view = bytearray(10)
    p.fill(memoryview(view), 5 * MIB - 5)
    assert bytes(view) == p.bytes(5 * MIB - 5, 10)


def test_size_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmtransport.testing._conformance import _size_from_env

    monkeypatch.setenv("VMTRANSPORT_CONFORMANCE_SIZE", "4G")
    assert _size_from_env() == 4 << 30
    monkeypatch.setenv("VMTRANSPORT_CONFORMANCE_SIZE", "1000")
    assert _size_from_env() == 1000
    monkeypatch.setenv("VMTRANSPORT_CONFORMANCE_SIZE", "lots")
    with pytest.raises(ValueError, match="VMTRANSPORT_CONFORMANCE_SIZE='lots': expected a"):
        run_check("roundtrip", PathFactory("file:{path}"), tmp_path)
