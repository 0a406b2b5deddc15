"""The transport conformance suite: what every transport (built-in or plugin) must do.

A plugin author describes how to reach the transport under test with a
:class:`TransportFactory` (URIs to save to and read back from, plus the optional targets
the error and event-loop checks need) and runs :func:`check_transport` (every check,
one report) or :func:`run_check` (one check: parametrize a pytest test over
:data:`CHECKS`). Each check drives the transport the way vmtransport does: sinks
through a real :class:`~vmtransport.Pipeline` (writer thread, page-aligned buffers,
write-behind), sources through ``readinto`` on a trio event loop.

Checks (see docs/plugins.md, "Conformance suite"):

``roundtrip``
    empty, tiny, odd-sized and a large input (``size`` bytes plus an odd tail, default
    64 MiB, ``VMTRANSPORT_CONFORMANCE_SIZE=4G`` for the multi-GiB shape) come back
    unchanged. The bytes are generated and compared as they flow, never held whole.
    Every read also obeys the end-of-stream rule: ``readinto`` returns 0 at the end and
    only there, and 0 again if asked once more.
``back-pressure``
    saving and reading back :data:`BACKPRESSURE_MIN` or more bytes with a slow consumer
    (a throttled reader of a concurrent channel, a throttled read-back) keeps this
    process's resident memory within :data:`MEMORY_BOUND` of where it started.
``cancel``
    a save cancelled mid-stream is aborted, never committed, and leaves nothing that
    looks complete (the factory's probe: nothing under the final name, say).
``errors``
    a target in a directory that does not exist, a full filesystem and a source that
    does not exist fail with :class:`~vmtransport.TransportError` naming the URI.
``event-loop``
    reading a source that stalls (nobody writes for :data:`STALL` seconds, at open and
    mid-stream) never blocks the trio event loop: a heartbeat every 10 ms is never late
    by more than :data:`LOOP_LATENESS` seconds (half the stall).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import shutil
import subprocess
import threading
import time
import unittest
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from .._errors import TransportError
from .._pipeline import Pipeline
from .._registry import Registry, get_registry
from .._transport import Sink, Source, Transport

MIB: Final = 1 << 20
#: the large input's default size (bytes); ``VMTRANSPORT_CONFORMANCE_SIZE`` overrides it
DEFAULT_SIZE: Final = 64 * MIB
#: growth of resident memory allowed while a slow consumer holds a stream back
MEMORY_BOUND: Final = 32 * MIB
#: the back-pressure check moves at least this many bytes (more than the bound)
BACKPRESSURE_MIN: Final = 96 * MIB
#: ... and at most this many, whatever ``size`` is
BACKPRESSURE_MAX: Final = 256 * MIB
#: how long a stalled source gives nothing (at open, and again mid-stream)
STALL: Final = 1.0
#: how late a 10 ms heartbeat may be while a source stalls
LOOP_LATENESS: Final = STALL / 2  # scheduling noise on a busy host stays under it
#: a cancelled save's writer thread must have ended (sink aborted) within this
CANCEL_END: Final = 10.0
#: the checks, in the order :func:`check_transport` runs them
CHECKS: Final = ("roundtrip", "back-pressure", "cancel", "errors", "event-loop")

_BLOCK = MIB  # the pattern's period before it is rotated
_READ = MIB  # read-back buffer size: page aligned, a multiple of 4 KiB
_SAVE_GEOMETRY = (MIB, 4)  # the pipeline's pool for back-pressure and cancel: 4 MiB


class ConformanceFailure(AssertionError):
    """A transport broke a rule: the message names the transport, the check, the input,
    what was expected and what happened."""


class NotApplicable(unittest.SkipTest):
    """The factory does not provide what a check needs (pytest reports a skip)."""


# --- what a plugin author provides --------------------------------------------------------


@dataclass
class Channel:
    """Where a stream is saved and where it is read back from.

    ``source`` may be a callable, called once the save has committed (or, for a
    ``concurrent`` channel, once the sink is open), for URIs that only exist then (a
    descriptor opened on the saved file). ``concurrent``: the source must be read while
    the sink writes (a pipe). ``looks_complete``, called after a cancelled save, says
    whether anything now passes for a complete stream (it must not); None: the suite
    checks only that the sink was aborted and never committed.
    """

    sink: str
    source: str | Callable[[], str]
    concurrent: bool = False
    looks_complete: Callable[[], bool] | None = None

    def source_uri(self) -> str:
        return self.source if isinstance(self.source, str) else self.source()


@dataclass
class Feed:
    """A source that the suite feeds: ``uri`` reads what is written to the descriptor
    ``open_writer()`` returns (called from a thread; it may block until the source has
    opened its end). The suite writes the stream, with stalls, and closes it."""

    uri: str
    open_writer: Callable[[], int]


class Workspace:
    """A fresh directory for one check, and clean-ups run when the check ends."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._stack = contextlib.ExitStack()

    def defer(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` when the check ends (last deferred first); its errors are ignored."""

        def quiet() -> None:
            with contextlib.suppress(Exception):
                fn()

        self._stack.callback(quiet)

    def close(self) -> None:
        self._stack.close()


class TransportFactory:
    """How the suite reaches the transport under test. Subclass it: :meth:`channel` is
    required; each other method returns None when the transport has no such thing (the
    checks that need it are then reported as not applicable).

    ``registry`` resolves the URIs (default: the process registry, with the installed
    plugins); ``name`` labels the failures.
    """

    name: str = "transport"
    registry: Registry | None = None

    def channel(self, ws: Workspace) -> Channel:
        raise NotImplementedError

    def missing_target(self, ws: Workspace) -> str | None:
        """A URI to save to whose directory (or equivalent) does not exist."""
        return None

    def full_target(self, ws: Workspace) -> str | None:
        """A URI to save to on a full (or tiny) filesystem: a save of a few MiB fails."""
        return None

    def missing_source(self, ws: Workspace) -> str | None:
        """A URI to read from that does not exist."""
        return None

    def stalled_source(self, ws: Workspace) -> Feed | None:
        """A source fed by the suite, so that it can stall."""
        return None

    def resolve(self, uri: str) -> Transport:
        """The transport for ``uri``, from :attr:`registry`."""
        return (self.registry or get_registry()).resolve(uri)


def fifo_feed(path: Path, uri: str) -> Feed:
    """A :class:`Feed` through a FIFO created at ``path``, read by ``uri``."""
    os.mkfifo(path, 0o600)

    def open_writer() -> int:
        end = time.monotonic() + 30
        while True:  # O_NONBLOCK: no reader yet is ENXIO, not a hang
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.ENXIO or time.monotonic() > end:
                    raise
                time.sleep(0.005)
                continue
            os.set_blocking(fd, True)
            return fd

    return Feed(uri, open_writer)


class PathFactory(TransportFactory):
    """A transport whose target is a path: ``template`` is its URI with ``{path}`` where
    the path goes (``"file:{path}"``, ``"odirect:{path},fallback=buffered"``, or a
    wrapping transport over one). A save must be atomic: after a cancel nothing is at
    the final name and nothing is left beside it. The full filesystem is a 1 MiB tmpfs
    when this process may mount one (root), else ``/dev/full``.
    """

    def __init__(
        self, template: str, *, name: str | None = None, registry: Registry | None = None
    ) -> None:
        if "{path}" not in template:
            raise ValueError(f"template {template!r} has no {{path}}")
        self.template = template
        self.name = name or template
        self.registry = registry

    def uri(self, path: Path | str) -> str:
        return self.template.replace("{path}", str(path))

    def channel(self, ws: Workspace) -> Channel:
        final = ws.path / "stream.sav"
        before = set(os.listdir(ws.path))

        def looks_complete() -> bool:
            left = sorted(set(os.listdir(ws.path)) - before - {final.name})
            if left:
                raise ConformanceFailure(f"left {', '.join(left)} beside {final}")
            return final.exists()

        return Channel(self.uri(final), self.uri(final), looks_complete=looks_complete)

    def missing_target(self, ws: Workspace) -> str:
        return self.uri(ws.path / "no-such-directory" / "stream.sav")

    def missing_source(self, ws: Workspace) -> str:
        return self.uri(ws.path / "no-such-file.sav")

    def full_target(self, ws: Workspace) -> str:
        point = ws.path / "full"
        if os.geteuid() == 0 and shutil.which("mount"):
            point.mkdir()
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(point)],
                capture_output=True,
                timeout=30,
                check=False,
            )
            if r.returncode == 0:
                ws.defer(lambda: _unmount(point))
                return self.uri(point / "stream.sav")
        return self.uri("/dev/full")

    def stalled_source(self, ws: Workspace) -> Feed:
        fifo = ws.path / "stalled.fifo"
        return fifo_feed(fifo, self.uri(fifo))


def _unmount(point: Path) -> None:
    r = subprocess.run(["umount", str(point)], capture_output=True, timeout=30, check=False)
    if r.returncode != 0:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30, check=False)


# --- the bytes -----------------------------------------------------------------------------


class Pattern:
    """A deterministic byte stream of any length, made as it is consumed: a 1 MiB random
    block, rotated differently in each MiB, so a dropped, repeated or misplaced byte
    shows (not as a byte of the same value) at its own offset."""

    def __init__(self, seed: int = 15) -> None:
        block = random.Random(seed).randbytes(_BLOCK)
        self._twice = block + block

    def fill(self, view: memoryview, pos: int) -> None:
        """Write the stream's bytes ``pos .. pos + len(view)`` into ``view``."""
        done, n = 0, len(view)
        while done < n:
            p = pos + done
            o = p % _BLOCK
            s = (o + (p // _BLOCK) * 7919) % _BLOCK
            take = min(n - done, _BLOCK - o)
            view[done : done + take] = self._twice[s : s + take]
            done += take

    def bytes(self, pos: int, n: int) -> bytes:
        buf = bytearray(n)
        self.fill(memoryview(buf), pos)
        return bytes(buf)


class _PatternSource(Source):
    """The suite's producer: ``size`` bytes of the pattern, fed to a Pipeline."""

    def __init__(self, pattern: Pattern, size: int) -> None:
        self._pattern = pattern
        self.size = size
        self.pos = 0

    async def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), self.size - self.pos)
        self._pattern.fill(buf[:n], self.pos)
        self.pos += n
        await trio.lowlevel.checkpoint()
        return n

    async def commit(self) -> None:
        pass

    async def abort(self) -> None:
        pass


class _Recorder(Sink):
    """Passes every call on to the sink under test, and counts them."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.commits = 0
        self.aborts = 0
        self.cancels = 0

    def write(self, data: memoryview) -> None:
        self.inner.write(data)

    def enable_write_behind(self) -> int:
        return self.inner.enable_write_behind()

    def commit(self) -> None:
        self.commits += 1
        self.inner.commit()

    def abort(self) -> None:
        self.aborts += 1
        self.inner.abort()

    def cancel(self) -> None:
        self.cancels += 1
        self.inner.cancel()


def _size_from_env() -> int:
    raw = os.environ.get("VMTRANSPORT_CONFORMANCE_SIZE", "").strip()
    if not raw:
        return DEFAULT_SIZE
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(raw[-1].upper(), 1)
    digits = raw[:-1] if raw[-1].upper() in units else raw
    try:
        value = int(digits) * scale
    except ValueError:
        value = -1
    if value <= 0:
        raise ValueError(
            f"VMTRANSPORT_CONFORMANCE_SIZE={raw!r}: expected a positive size such as 64M or 4G"
        )
    return value


def inputs(size: int) -> list[tuple[str, int, bool]]:
    """The roundtrip check's inputs: (label, length, written unaligned)."""
    big = size + 12_345  # odd: not a multiple of a page, a buffer or the pattern
    return [
        ("empty", 0, False),
        ("tiny (1 byte)", 1, False),
        ("tiny (7 bytes)", 7, False),
        ("odd-sized (one page less one byte)", 4095, False),
        ("odd-sized (buffers and a page and a byte)", 2 * 8 * MIB + 4097, False),
        ("odd-sized, in unaligned read-only writes (as a restore or copy hands them)",
         3 * MIB + 12_345, True),
        (f"large ({_human(big)}, streamed)", big, False),
    ]  # fmt: skip


#: the write sizes of an unaligned save, in turn (each from a view at an odd address)
_UNALIGNED_WRITES: Final = (1, 4095, 4097, 65_537, 3, MIB + 1)


def _human(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


# --- running one check ---------------------------------------------------------------------


class _Check:
    """One check's context: its name, the factory, the failure messages' prefix."""

    def __init__(self, name: str, factory: TransportFactory, ws: Workspace, size: int) -> None:
        self.name = name
        self.factory = factory
        self.ws = ws
        self.size = size
        self.pattern = Pattern()

    async def save_unaligned(self, uri: str, size: int, input: str) -> None:
        """Save ``size`` pattern bytes to ``uri`` the way a restore or a copy hands them
        to a sink: read-only views that start at odd addresses, of odd lengths, with no
        write-behind (the views are not the pipeline's), from one thread."""
        transport = self.factory.resolve(uri)

        def run() -> None:
            sink = transport.open_sink()
            try:
                pos, i = 0, 0
                while pos < size:
                    n = min(_UNALIGNED_WRITES[i % len(_UNALIGNED_WRITES)], size - pos)
                    chunk = b"\0" + self.pattern.bytes(pos, n)
                    with memoryview(chunk) as view:
                        sink.write(view[1:])
                    pos, i = pos + n, i + 1
                sink.commit()
            except BaseException:
                sink.abort()
                raise

        await trio.to_thread.run_sync(run)

    async def read_by_pipeline(self, uri: str, size: int, input: str) -> None:
        """Read ``uri`` back as ``vmtransport restore`` does: a Pipeline from the
        transport, through its blocking reads when it offers them
        (:meth:`~vmtransport.Transport.open_threaded_source`: reader threads, several
        reads at once where the source allows), else its async source."""
        transport = self.factory.resolve(uri)
        check = _Comparing(self, size, input + ", read back by a Pipeline")
        pipeline = Pipeline(transport, check, label=uri)
        try:
            await pipeline.run_async()
        except ConformanceFailure:
            raise
        except Exception as exc:
            raise self.fail(
                f"reading {uri} back through a Pipeline (as vmtransport restore does) failed: "
                f"{type(exc).__name__}: {exc}",
                input,
            ) from exc

    def fail(self, what: str, input: str = "") -> ConformanceFailure:
        where = f", input {input}" if input else ""
        return ConformanceFailure(f"[{self.factory.name}] check {self.name!r}{where}: {what}")

    async def save(
        self,
        uri: str,
        size: int,
        input: str,
        *,
        geometry: tuple[int, int] | None = None,
        started: Callable[[Pipeline, _Recorder], None] | None = None,
    ) -> _Recorder:
        """Save ``size`` pattern bytes to ``uri`` through a Pipeline; raise its error."""
        transport = self.factory.resolve(uri)
        sink = _Recorder(await trio.to_thread.run_sync(transport.open_sink))
        buffer_size, buffers = geometry or (8 * MIB, 8)
        pipeline = Pipeline(
            _PatternSource(self.pattern, size),
            sink,
            label=uri,
            buffer_size=buffer_size,
            buffers=buffers,
        )
        if started is not None:
            started(pipeline, sink)
        await pipeline.run_async()
        if sink.commits != 1:
            raise self.fail(f"the save succeeded with {sink.commits} commits (expected 1)", input)
        return sink

    async def read_back(
        self,
        uri: str,
        size: int,
        input: str,
        *,
        throttle: float = 0.0,
        piece: int = _READ,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Open ``uri`` and read it as the pipeline does, checking every read against the
        pattern and the end-of-stream rule; return the bytes read. ``size`` -1: any
        length, contents unchecked (a cancelled save's reader)."""
        transport = self.factory.resolve(uri)
        source = await transport.open_source()
        ok = False
        try:
            total = await self._read_all(source, size, input, throttle, piece, progress)
            await source.commit()
            ok = True
            return total
        finally:
            if not ok:
                with trio.CancelScope(shield=True):
                    await source.abort()

    async def _read_all(
        self,
        source: Source,
        size: int,
        input: str,
        throttle: float,
        piece: int,
        progress: Callable[[int], None] | None,
    ) -> int:
        buf = mmap.mmap(-1, piece, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        total = 0
        try:
            with memoryview(buf) as whole:
                while True:
                    filled = 0
                    while filled < piece:
                        view = whole[filled:]
                        n = await source.readinto(view)
                        del view
                        if not isinstance(n, int) or n < 0 or n > piece - filled:
                            raise self.fail(
                                f"readinto() of {piece - filled} bytes returned {n!r} "
                                f"(expected 0..{piece - filled})",
                                input,
                            )
                        if n == 0:
                            break
                        got = bytes(whole[filled : filled + n])
                        if size >= 0:
                            if total + n > size:
                                raise self.fail(
                                    f"the source returned {total + n - size} bytes more "
                                    f"than the {size} saved",
                                    input,
                                )
                            want = self.pattern.bytes(total, n)
                            if got != want:
                                at = next(i for i in range(n) if got[i] != want[i])
                                raise self.fail(
                                    f"the bytes differ from what was saved at offset "
                                    f"{total + at} (read {got[at]:#04x}, saved "
                                    f"{want[at]:#04x})",
                                    input,
                                )
                        filled += n
                        total += n
                        if progress is not None:
                            progress(total)
                        if throttle:
                            await trio.sleep(throttle)
                    if filled < piece:
                        break
                if size >= 0 and total != size:
                    raise self.fail(
                        f"readinto() returned 0 (end of stream) after {total} of the "
                        f"{size} bytes saved: bytes were lost, or the source says the "
                        "stream ended before it did (b'' means end of stream only)",
                        input,
                    )
                with memoryview(buf) as again:
                    n = await source.readinto(again)
                if n != 0:
                    raise self.fail(
                        f"end-of-stream rule: readinto() returned {n!r} after it had "
                        "returned 0 (expected 0 again: b'' means end of stream)",
                        input,
                    )
        finally:
            buf.close()
        return total

    async def roundtrip(
        self,
        channel: Channel,
        size: int,
        input: str,
        *,
        geometry: tuple[int, int] | None = None,
        throttle: float = 0.0,
        piece: int = _READ,
        unaligned: bool = False,
        threaded: bool = False,
    ) -> None:
        """Save ``size`` bytes into ``channel`` and read them back (while saving, for a
        concurrent channel); with ``threaded``, read them back once more as ``vmtransport
        restore`` does."""
        if channel.concurrent:
            async with trio.open_nursery() as nursery:
                # The source URI may need the sink to be open first (a pipe's far end).
                result: list[int] = []

                async def read() -> None:
                    uri = channel.source_uri()
                    result.append(
                        await self.read_back(uri, size, input, throttle=throttle, piece=piece)
                    )

                nursery.start_soon(read)
                await self.save_failing(channel.sink, size, input, geometry, unaligned)
            return
        await self.save_failing(channel.sink, size, input, geometry, unaligned)
        await self.read_back(channel.source_uri(), size, input, throttle=throttle, piece=piece)
        if threaded:
            await self.read_by_pipeline(channel.source_uri(), size, input)

    async def save_failing(
        self,
        uri: str,
        size: int,
        input: str,
        geometry: tuple[int, int] | None,
        unaligned: bool = False,
    ) -> None:
        try:
            if unaligned:
                await self.save_unaligned(uri, size, input)
            else:
                await self.save(uri, size, input, geometry=geometry)
        except ConformanceFailure:
            raise
        except Exception as exc:
            raise self.fail(
                f"the save to {uri} failed: {type(exc).__name__}: {exc}", input
            ) from exc


class _Comparing(Sink):
    """A sink that checks what it is given against the pattern (a read-back's end)."""

    def __init__(self, check: _Check, size: int, input: str) -> None:
        self._check = check
        self._size = size
        self._input = input
        self.total = 0

    def write(self, data: memoryview) -> None:
        n = len(data)
        if self.total + n > self._size:
            raise self._check.fail(
                f"the source returned {self.total + n - self._size} bytes more than the "
                f"{self._size} saved",
                self._input,
            )
        got, want = bytes(data), self._check.pattern.bytes(self.total, n)
        if got != want:
            at = next(i for i in range(n) if got[i] != want[i])
            raise self._check.fail(
                f"the bytes differ from what was saved at offset {self.total + at} (read "
                f"{got[at]:#04x}, saved {want[at]:#04x})",
                self._input,
            )
        self.total += n

    def commit(self) -> None:
        if self.total != self._size:
            raise self._check.fail(
                f"the source ended after {self.total} of the {self._size} bytes saved",
                self._input,
            )

    def abort(self) -> None:
        pass


def _run(check: _Check, body: Callable[[], Awaitable[None]]) -> None:
    try:
        trio.run(body)
    except BaseExceptionGroup as group:
        failures = group.subgroup(ConformanceFailure)
        if failures is not None:
            raise _leaf(failures) from group
        raise


def _leaf(group: BaseExceptionGroup[ConformanceFailure]) -> ConformanceFailure:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, ConformanceFailure)
    return exc


# --- the checks ----------------------------------------------------------------------------


def _roundtrip(c: _Check) -> None:
    for label, length, unaligned in inputs(c.size):
        ws = Workspace(c.ws.path / f"input-{length}")
        try:
            channel = c.factory.channel(ws)

            async def body(
                channel: Channel = channel,
                label: str = label,
                n: int = length,
                unaligned: bool = unaligned,
            ) -> None:
                await c.roundtrip(channel, n, label, unaligned=unaligned, threaded=True)

            _run(c, body)
        finally:
            ws.close()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


@contextlib.contextmanager
def _peak_rss() -> Iterator[list[int]]:
    """Samples resident memory every 2 ms; yields [baseline, peak] (peak filled at exit)."""
    base = _rss()
    result = [base, base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            result[1] = max(result[1], _rss())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield result
    finally:
        stop.set()
        t.join()
        result[1] = max(result[1], _rss())


def _backpressure(c: _Check) -> None:
    size = min(max(c.size, BACKPRESSURE_MIN), BACKPRESSURE_MAX)
    label = f"{_human(size)} with a slow consumer"
    channel = c.factory.channel(c.ws)
    # A slow consumer: 64 KiB reads, 1 ms apart (under 64 MiB/s).
    throttle, piece = 0.001, 64 << 10

    async def body() -> None:
        if channel.concurrent:
            with _peak_rss() as rss:
                await c.roundtrip(
                    channel, size, label, geometry=_SAVE_GEOMETRY, throttle=throttle, piece=piece
                )
            _bound(c, rss, label, "while a slow reader held the save back")
            return
        with _peak_rss() as rss:
            await c.save_failing(channel.sink, size, label, _SAVE_GEOMETRY)
        _bound(c, rss, label, "while saving")
        with _peak_rss() as rss:
            await c.read_back(channel.source_uri(), size, label, throttle=throttle, piece=piece)
        _bound(c, rss, label, "while a slow consumer read the source")

    _run(c, body)


def _bound(c: _Check, rss: list[int], label: str, when: str) -> None:
    grew = rss[1] - rss[0]
    if grew > MEMORY_BOUND:
        raise c.fail(
            f"resident memory grew by {_human(grew)} {when} (bound: {_human(MEMORY_BOUND)}; "
            "the pipeline's own buffers are 4 MiB): data is buffered instead of being "
            "held back",
            label,
        )


def _cancel(c: _Check) -> None:
    channel = c.factory.channel(c.ws)
    label = "a save cancelled after 4 MiB"
    huge = 1 << 40  # never reached
    buffer_size, _ = _SAVE_GEOMETRY

    async def body() -> None:
        state: dict[str, object] = {}

        def started(pipeline: Pipeline, sink: _Recorder) -> None:
            state["pipeline"], state["sink"] = pipeline, sink

        save_scope = trio.CancelScope()

        async def save() -> None:
            with save_scope, contextlib.suppress(Exception):
                await c.save(channel.sink, huge, label, geometry=_SAVE_GEOMETRY, started=started)
            state["ended"] = True

        async def drain() -> None:  # a concurrent channel's reader: reads to the end
            with contextlib.suppress(Exception):  # the stream ends short: expected
                await c.read_back(channel.source_uri(), -1, label)

        with trio.fail_after(60 + CANCEL_END):
            async with trio.open_nursery() as nursery:
                if channel.concurrent:
                    nursery.start_soon(drain)
                nursery.start_soon(save)
                while True:
                    p = state.get("pipeline")
                    if state.get("ended"):
                        raise c.fail("the save ended before it could be cancelled", label)
                    if isinstance(p, Pipeline) and p.total >= 4 * buffer_size:
                        break
                    await trio.sleep(0.005)
                save_scope.cancel()
        pipeline, sink = state["pipeline"], state["sink"]
        assert isinstance(pipeline, Pipeline) and isinstance(sink, _Recorder)
        end = time.monotonic() + CANCEL_END
        while not pipeline.finished and time.monotonic() < end:
            await trio.sleep(0.01)
        if not pipeline.finished:
            raise c.fail(
                f"the sink's write or abort had not returned {CANCEL_END:g} s after the "
                "cancel (Sink.cancel must make a blocked write return)",
                label,
            )
        if sink.commits:
            raise c.fail("the cancelled save's sink was committed", label)
        if sink.aborts != 1:
            raise c.fail(f"the cancelled save's sink was aborted {sink.aborts} times", label)
        if channel.looks_complete is not None and channel.looks_complete():
            raise c.fail(
                "after the cancel, the target looks complete (expected nothing under the "
                "final name)",
                label,
            )

    _run(c, body)


def _errors(c: _Check) -> None:
    cases: list[tuple[str, str | None, str]] = [
        ("a target whose directory does not exist", c.factory.missing_target(c.ws), "save"),
        ("a target on a full filesystem", c.factory.full_target(c.ws), "save"),
        ("a source that does not exist", c.factory.missing_source(c.ws), "read"),
    ]
    if all(uri is None for _, uri, _ in cases):
        raise NotApplicable(f"{c.factory.name}: the factory provides no failing targets")
    for label, uri, how in cases:
        if uri is None:
            continue

        async def body(uri: str = uri, label: str = label, how: str = how) -> None:
            try:
                if how == "save":
                    await c.save(uri, 8 * MIB + 1, label)
                else:
                    await c.read_back(uri, 0, label)
            except ConformanceFailure:
                raise
            except TransportError as exc:
                text = str(exc)
                if uri not in text:
                    raise c.fail(
                        f"the error does not name the URI {uri!r}: {type(exc).__name__}: {text}",
                        label,
                    ) from exc
                if "\n" in text:
                    raise c.fail(f"the error is not one line: {text!r}", label) from exc
                return
            except Exception as exc:
                raise c.fail(
                    f"expected a vmtransport.TransportError naming {uri!r}, got "
                    f"{type(exc).__module__}.{type(exc).__name__}: {exc}",
                    label,
                ) from exc
            raise c.fail(
                f"expected a vmtransport.TransportError naming {uri!r}, but the "
                f"{'save' if how == 'save' else 'read'} succeeded",
                label,
            )

        _run(c, body)


def _event_loop(c: _Check) -> None:
    feed = c.factory.stalled_source(c.ws)
    if feed is None:
        raise NotApplicable(f"{c.factory.name}: the factory provides no stalled source")
    size = 3 * MIB + 5
    label = f"a source that stalls {STALL:g} s at open and mid-stream"
    written: list[BaseException] = []

    def writer() -> None:
        try:
            time.sleep(STALL)
            fd = feed.open_writer()
            try:
                data = c.pattern.bytes(0, size)
                view = memoryview(data)
                first = MIB + 3
                while view[:first]:
                    n = os.write(fd, view[:first])
                    view, first = view[n:], first - n
                time.sleep(STALL)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except BaseException as exc:
            written.append(exc)

    async def body() -> None:
        late, last = [0.0], [trio.current_time()]
        thread = threading.Thread(target=writer, daemon=True)

        def tick() -> None:
            now = trio.current_time()
            late[0] = max(late[0], now - last[0] - 0.01)
            last[0] = now

        async def heartbeat() -> None:
            while True:
                await trio.sleep(0.01)
                tick()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat)
            await trio.sleep(0.02)
            last[0] = trio.current_time()
            thread.start()
            with trio.fail_after(60):
                await c.read_back(feed.uri, size, label)
            tick()  # a source that never yields starved the heartbeat until now
            nursery.cancel_scope.cancel()
        await trio.to_thread.run_sync(thread.join, 10.0)
        if written:
            raise c.fail(f"the suite's writer failed: {written[0]!r}", label)
        if late[0] > LOOP_LATENESS:
            raise c.fail(
                f"the trio event loop was blocked for {late[0]:.2f} s (a 10 ms heartbeat "
                f"may be late by at most {LOOP_LATENESS:g} s): the source blocks in "
                "open_source() or readinto() instead of waiting in a thread or with "
                "trio.lowlevel.wait_readable",
                label,
            )

    _run(c, body)


_FUNCTIONS: Final[dict[str, Callable[[_Check], None]]] = {
    "roundtrip": _roundtrip,
    "back-pressure": _backpressure,
    "cancel": _cancel,
    "errors": _errors,
    "event-loop": _event_loop,
}


def run_check(
    name: str, factory: TransportFactory, workdir: Path | str, *, size: int | None = None
) -> None:
    """Run one check of :data:`CHECKS` on ``factory``'s transport, in ``workdir`` (an
    empty directory, e.g. pytest's ``tmp_path``). Raises :class:`ConformanceFailure`
    (an AssertionError) saying what is wrong, or :class:`NotApplicable` (a
    ``unittest.SkipTest``) when the factory lacks what the check needs. ``size``: the
    large input's length (default: ``VMTRANSPORT_CONFORMANCE_SIZE``, else 64 MiB).

    Call it from synchronous code (it runs its own trio loop), not from a trio task.
    """
    try:
        fn = _FUNCTIONS[name]
    except KeyError:
        known = ", ".join(CHECKS)
        raise ValueError(f"unknown conformance check {name!r} (known: {known})") from None
    ws = Workspace(Path(workdir) / name)
    try:
        fn(_Check(name, factory, ws, _size_from_env() if size is None else size))
    finally:
        ws.close()


@dataclass
class Report:
    """What :func:`check_transport` found: check name -> failure message, and the checks
    that did not apply."""

    failures: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    passed: list[str] = field(default_factory=list)


def check_transport(
    factory: TransportFactory,
    workdir: Path | str,
    *,
    size: int | None = None,
    checks: Sequence[str] = CHECKS,
) -> Report:
    """Run ``checks`` (default: all) on ``factory``'s transport; raise one
    :class:`ConformanceFailure` listing every failed check, else return the report."""
    report = Report()
    for name in checks:
        try:
            run_check(name, factory, workdir, size=size)
        except ConformanceFailure as exc:
            report.failures[name] = str(exc)
        except unittest.SkipTest as exc:
            report.skipped[name] = str(exc)
        else:
            report.passed.append(name)
    if report.failures:
        raise ConformanceFailure("\n".join(report.failures.values()))
    return report
