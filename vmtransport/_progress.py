"""Progress people can read and tools can parse (``--progress``, ``--events json``).

A :class:`Reporter` gathers what a transfer says about itself — the pipeline's
:class:`~._pipeline.Progress` and :class:`~._pipeline.StateEvent`, QEMU's
``query-migrate`` figures and ``MIGRATION`` states, the VM's run state — and turns it
into events (dicts, the schema of docs/events.md) for one renderer: :class:`BarRenderer`
(a line redrawn in place on a terminal) or :class:`JsonRenderer` (one JSON object a
line). The reporter's own thread emits ``progress`` every :data:`INTERVAL` seconds
whether bytes move or not, so a stalled transfer still shows (and a tool sees it is
alive).

Inputs arrive from the pipeline's writer thread, from trio tasks and from the
reporter's thread: one lock orders them into a queue, and only the reporter's thread
writes, so a stderr that nobody reads stalls the report, never the transfer. Output
errors (a closed stderr) silence the renderer; they never fail the transfer.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from ._pipeline import Pipeline, Progress, StateEvent
    from .qmp import EventListener

#: version of the event schema (docs/events.md); bumped on any incompatible change
SCHEMA_VERSION: Final = 1
#: seconds between two ``progress`` events (the promise is at most 0.5 s)
INTERVAL: Final = 0.25
#: seconds of history the rate and the ETA are computed over
RATE_WINDOW: Final = 3.0
#: where a state comes from (the ``source`` of a ``state`` event)
SOURCES: Final = ("qemu", "pipeline", "vm", "failover")

Event = dict[str, Any]


class Renderer(Protocol):
    """Where a reporter's events go. ``emit`` is called from the reporter's own thread
    only (after :meth:`Reporter.close`, for a late ``output`` line, from its caller)."""

    def emit(self, event: Event) -> None: ...


class JsonRenderer:
    """One JSON object a line (compact, UTF-8), flushed at once."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.broken = False

    def emit(self, event: Event) -> None:
        if self.broken:
            return
        try:
            self.stream.write(json.dumps(event, separators=(",", ":")) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a reader that went away: stop talking
            self.broken = True


class BarRenderer:
    """One line on a terminal, redrawn in place with ``\\r`` and erase-to-end-of-line,
    never wider than the terminal (a wrapped line could not be redrawn). A result
    leaves the final figures on their line and ends it; an error erases the bar, so the
    error line that follows is a line of its own."""

    def __init__(self, stream: IO[str] | None = None, *, width: int | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.drawn = False
        self.broken = False
        self.operation = ""
        self.phase = ""

    def _columns(self) -> int:
        if self.width is not None:
            return self.width
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 0
        return columns or 80  # a terminal nobody gave a size (a fresh pty) says 0

    def _write(self, text: str) -> None:
        if self.broken:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.broken = True

    def _draw(self, line: str, *, end: str = "") -> None:
        line = line[: max(self._columns() - 1, 10)]  # the last column would wrap on some
        self._write(f"\r{line}\x1b[K{end}")
        self.drawn = not end

    def erase(self) -> None:
        if self.drawn:
            self._write("\r\x1b[K")
            self.drawn = False

    def emit(self, event: Event) -> None:
        kind = event["event"]
        if kind == "start":
            self.operation = str(event.get("operation", ""))
        elif kind == "state" and event["source"] in ("qemu", "pipeline"):
            self.phase = str(event["state"])
        elif kind == "progress":
            phase = self.phase
            if isinstance(wait := event.get("unplug"), Mapping):
                phase = f"waiting for the guest to unplug {wait['devices']}: {wait['waited']:.0f} s"
            self._draw(bar_line(event, self.operation, phase, self._columns()))
        elif kind == "result":
            self._draw(result_line(event, self.operation), end="\n")
        elif kind == "error":
            self.erase()
        elif kind == "output":  # a line of its own above the bar (redrawn next tick)
            self.erase()
            self._write(f"{event['text']}\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    s = int(s + 0.5)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def bar_line(event: Event, operation: str = "", phase: str = "", columns: int = 80) -> str:
    """``save  [#####     ]  52%  1.0 GiB / 2.0 GiB  812.3 MiB/s  ETA 0:01``."""
    fraction = event.get("fraction")
    total = event.get("total")
    eta = event.get("eta")
    figures = human_bytes(event["bytes"])
    if total is not None:
        figures += f" / {human_bytes(total)}"
    tail = f"{figures}  {human_bytes(event['rate'])}/s"
    tail += f"  ETA {human_seconds(eta)}" if eta is not None else ""
    if phase and phase not in ("active", "started", "completed", "complete"):
        tail += f"  ({phase})"
    head = f"{operation} " if operation else ""
    if fraction is None:
        return f"{head}{tail}"
    room = columns - 1 - len(head) - len(tail) - 9  # brackets, percentage, spaces
    cells = min(max(room, 0), 30)
    filled = int(fraction * cells)
    bar = f"[{'#' * filled}{' ' * (cells - filled)}] " if cells >= 5 else ""
    return f"{head}{bar}{fraction * 100:3.0f}%  {tail}"


def result_line(event: Event, operation: str = "") -> str:
    """``save  done: 2.0 GiB in 2.5 s (812.3 MiB/s)``."""
    head = f"{operation} " if operation else ""
    return (
        f"{head}done: {human_bytes(event['bytes'])} in {event['seconds']:.1f} s "
        f"({human_bytes(event['rate'])}/s)"
    )


def image_path(uri: str) -> str | None:
    """The file a ``file:``/``odirect:`` URI names (its options left out), else None."""
    from ._uri import parse_uri

    try:
        parsed = parse_uri(uri)
    except Exception:
        return None
    return parsed.target if parsed.scheme in ("file", "odirect") else None


class Reporter:
    """Turns a transfer's progress and states into events for ``renderer``.

    Call :meth:`start` first (progress events follow from then on), feed it from anywhere
    (:meth:`attach` a pipeline, :meth:`migration` with ``query-migrate`` replies,
    :meth:`qemu_state` with ``MIGRATION`` events' statuses, :meth:`state`), and end it
    with exactly one :meth:`result` or :meth:`error` (later ones are ignored, so the
    innermost layer that knows best wins); :meth:`close` stops its thread (a context
    manager's exit does it too).
    """

    def __init__(
        self,
        renderer: Renderer,
        *,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.renderer = renderer
        self.interval = interval
        self._clock = clock
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._writer: threading.Thread | None = None
        self._pending: deque[Event] = deque()  # events made, not yet written
        self._t0 = clock()
        self.started = False
        self.ended = False
        self.bytes = 0  # the pipeline's bytes, handed to the sink
        self.total: int | None = None
        self.qemu_figures: dict[str, Any] | None = None  # the latest query-migrate figures
        self.unplug: tuple[str, float] | None = None  # primaries waited for, since when
        self.states: dict[str, str] = {}  # source -> the latest state
        self._samples: deque[tuple[float, int]] = deque()  # (t, bytes)
        self._total_of: Callable[[], int | None] | None = None  # asked until it knows

    # -- lifecycle
    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, operation: str, **fields: Any) -> None:
        """Emit ``start`` (``operation``: save, restore, copy; ``fields``: uri,
        monitor...); ``progress`` follows every interval. Repeats are ignored."""
        with self._lock:
            if self.started:
                return
            self.started = True
            self._t0 = self._clock()
            self._samples.append((self._t0, 0))  # rates count from the start
            self._emit({"event": "start", "operation": operation, "pid": os.getpid(), **fields})

    def _write(self) -> None:
        """The writer thread: makes a ``progress`` event every interval once started,
        and alone calls the renderer. Whoever reports only queues (under the lock, so
        in order): a stderr nobody reads blocks this thread, never the pipeline's
        writer or the event loop."""
        next_tick = self._clock() + self.interval
        while True:
            wait = next_tick - self._clock()
            if wait > 0 and not self._stop.is_set():
                self._wake.wait(wait)
            self._wake.clear()
            with self._lock:
                now = self._clock()
                if now >= next_tick:
                    next_tick = max(next_tick + self.interval, now)
                    if self.started and not self.ended:
                        self._emit(self._progress())
                batch = list(self._pending)
                self._pending.clear()
                done = self._stop.is_set()
            for event in batch:
                try:
                    self.renderer.emit(event)
                except Exception:  # a renderer never breaks the transfer
                    pass
            if done and not batch:
                return

    def own_stderr(self) -> None:
        """From now on, for good (the command line's reporter: the process ends with
        it), take the lines other parts write to stderr (log records, an ``exec:``
        target's stderr) as ``output`` events: they then neither garble the bar nor
        break the JSON lines, even after the end (``-v``'s statistics)."""
        from . import _log

        _log.stderr_hook = self._output

    def _output(self, text: str) -> None:
        event: Event = {"event": "output", "text": text.rstrip("\n")}
        with self._lock:
            if not self._stop.is_set():
                self._emit(event)
                return
            # Closed: no thread writes any more; this line goes out at once.
            t = round(self._clock() - self._t0, 3)
            try:
                self.renderer.emit({"v": SCHEMA_VERSION, "t": t, **event})
            except Exception:
                pass

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and stop the writer thread; waits at most ``timeout``
        seconds for a stderr that does not take the lines. Idempotent."""
        self._stop.set()
        self._wake.set()
        writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join(timeout)

    # -- inputs
    def attach(self, pipeline: Pipeline) -> None:
        """Follow ``pipeline``: its bytes and its states (source ``pipeline``). A
        restore's or copy's pipeline also gives the total once its verifying reader has
        read the image's header: the image's length (header and payload), which is
        what such a pipeline counts."""
        pipeline.on_progress(self.pipeline_progress)
        pipeline.on_event(self.pipeline_event)
        reader = getattr(pipeline, "reader", None)
        if reader is not None and hasattr(reader, "header"):
            self._total_of = lambda: (
                reader.header.payload_offset + reader.header.payload_length
                if reader.header is not None
                else None
            )

    def pipeline_progress(self, progress: Progress) -> None:
        with self._lock:
            self.bytes = progress.bytes

    def pipeline_event(self, event: StateEvent) -> None:
        with self._lock:
            self.bytes = max(self.bytes, event.bytes)
            detail = {"detail": event.detail} if event.detail else {}
            self._state("pipeline", event.state, detail)

    def set_total(self, total: int | None) -> None:
        """The byte count to expect, for a caller that knows it better (:meth:`attach`
        learns a restore's from its image, :meth:`migration` a save's from QEMU)."""
        with self._lock:
            self.total = total

    def migration(self, info: Mapping[str, Any]) -> None:
        """A ``query-migrate`` reply: its RAM figures (``ram.total`` becomes the
        total). Its status is left to :meth:`qemu_state`: a poll may see a state
        before the ``MIGRATION`` event announcing it has been read."""
        ram = info.get("ram")
        with self._lock:
            figures: dict[str, Any] = {"status": info.get("status")}
            if isinstance(ram, Mapping):
                for key in ("transferred", "remaining", "total"):
                    if isinstance(ram.get(key), int):
                        figures[f"ram_{key}"] = ram[key]
                if figures.get("ram_total"):
                    self.total = figures["ram_total"]
            self.qemu_figures = figures

    def qemu_state(self, status: str) -> None:
        """QEMU's migration status changed (a ``MIGRATION`` event's ``status``)."""
        with self._lock:
            self._state("qemu", status, {})

    def qemu(
        self, info: Mapping[str, Any] | None = None, events: EventListener | None = None
    ) -> None:
        """One call per ``query-migrate`` poll: the ``MIGRATION`` events ``events``
        holds first (QEMU's states, in order), then ``info``'s figures."""
        if events is not None:
            self.drain(events)
        if info is not None:
            self.migration(info)

    def drain(self, listener: EventListener) -> None:
        """Take the ``MIGRATION`` events ``listener`` holds (reads nothing) as QEMU's
        states; other events are dropped."""
        while (event := listener.get_nowait()) is not None:
            status = event.data.get("status")
            if event.name == "MIGRATION" and isinstance(status, str):
                self.qemu_state(status)

    def waiting(self, devices: str | None) -> None:
        """The save waits from now on for the guest to unplug failover primaries
        ``devices`` (None: no more); ``progress`` events say so, with the seconds
        waited."""
        with self._lock:
            if devices is None:
                self.unplug = None
            elif self.unplug is None or self.unplug[0] != devices:
                self.unplug = (devices, self._clock())

    def state(self, source: str, state: str, **detail: Any) -> None:
        """Any other state change (``source`` one of :data:`SOURCES`); repeats of the
        source's current state are dropped."""
        with self._lock:
            self._state(source, state, detail)

    # -- the end
    def result(self, **fields: Any) -> None:
        """The transfer succeeded: a last ``progress`` with the final figures, then
        ``result`` with ``fields`` (bytes, seconds, uri...; ``rate`` is derived)."""
        with self._lock:
            if self.ended:
                return
            self.ended = True
            self.bytes = int(fields.get("bytes", self.bytes))
            if self.started:
                last = self._progress()
                if last["total"] is not None:
                    last["fraction"], last["eta"] = 1.0, 0.0
                self._emit(last)
            seconds = round(float(fields.pop("seconds", self._clock() - self._t0)), 3)
            rate = round(self.bytes / seconds, 1) if seconds > 0 else 0.0
            fields.pop("bytes", None)
            self._emit(
                {"event": "result", "ok": True, "bytes": self.bytes, "seconds": seconds,
                 "rate": rate, **fields}
            )  # fmt: skip
        self.close()

    def error(self, message: str, **fields: Any) -> None:
        """The transfer failed: ``error`` with ``message`` (the one-line error) and
        ``fields`` (``vm``: where the VM was left; ``exit``: the exit status)."""
        with self._lock:
            if self.ended:
                return
            self.ended = True
            fields.setdefault("vm_state", self.states.get("vm"))
            self._emit({"event": "error", "ok": False, "message": message, **fields})
        self.close()

    # -- internals (under the lock)
    def _emit(self, event: Event) -> None:
        t = round(self._clock() - self._t0, 3)
        pending = self._pending
        if event["event"] == "progress" and pending and pending[-1]["event"] == "progress":
            pending.pop()  # not written yet (a slow stderr): the newer figures replace it
        pending.append({"v": SCHEMA_VERSION, "t": t, **event})
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name="vmtransport-progress")
            self._writer.daemon = True
            self._writer.start()
        self._wake.set()

    def _state(self, source: str, state: str, detail: Mapping[str, Any]) -> None:
        if self.states.get(source) == state or self.ended:
            return
        self.states[source] = state
        self._emit({"event": "state", "source": source, "state": state, **detail})

    def _progress(self) -> Event:
        now = self._clock()
        qemu = self.qemu_figures or {}
        if self.total is None and self._total_of is not None:
            try:
                self.total = self._total_of()
            except Exception:  # read from another thread mid-update: ask again later
                pass
        total = self.total
        # The byte count to expect. From QEMU: what it has sent plus what it still has
        # to send; the pump's buffers hold up to 64 MiB of what it has sent, and zero
        # pages make the stream much shorter than RAM, so RAM done is no measure of the
        # image written. Else the total (a restore: the image's length).
        whole: int | None = total or None
        if isinstance(qemu.get("ram_transferred"), int) and "ram_remaining" in qemu:
            whole = max(qemu["ram_transferred"] + qemu["ram_remaining"], self.bytes)
        samples = self._samples
        samples.append((now, self.bytes))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        t0, b0 = samples[0]
        span = now - t0
        rate = (self.bytes - b0) / span if span > 0 else 0.0
        fraction = eta = None
        if whole:
            fraction = min(self.bytes / whole, 1.0)
            if rate > 0:
                eta = round(max(whole - self.bytes, 0) / rate, 1)
        event: Event = {
            "event": "progress",
            "bytes": self.bytes,
            "total": total,
            "fraction": None if fraction is None else round(fraction, 4),
            "rate": round(rate, 1),
            "eta": eta,
        }
        if self.qemu_figures is not None:
            event["qemu"] = dict(self.qemu_figures)
        if self.unplug is not None:
            devices, since = self.unplug
            event["unplug"] = {"devices": devices, "waited": round(now - since, 1)}
        return event


def make_reporter(
    progress: bool | None,
    events: str | None,
    *,
    default: bool,
    stream: IO[str] | None = None,
) -> Reporter | None:
    """The reporter the command line asked for: ``events`` ("json") wins over the bar;
    ``progress`` None means ``default`` and only on a terminal (``default`` is False
    for the ``exec:`` helpers QEMU runs: they print nothing unless asked)."""
    stream = stream if stream is not None else sys.stderr
    renderer: Renderer
    if events == "json":
        renderer = JsonRenderer(stream)
    else:
        if progress is None:
            try:
                progress = default and stream.isatty()
            except (OSError, ValueError, AttributeError):
                progress = False
        if not progress:
            return None
        renderer = BarRenderer(stream)
    reporter = Reporter(renderer)
    reporter.own_stderr()
    return reporter
