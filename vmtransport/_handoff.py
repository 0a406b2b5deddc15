"""The start of a QMP-driven restore, before trio: QEMU gets its stream sooner.

QEMU's load is what a restore waits for, so every millisecond before QEMU has its first
byte is lost. The command line's ``restore --qmp`` therefore does the first part of
:func:`~._restore_vm.restore_vm` here, blocking, with nothing but the pipeline's own
modules loaded (trio and the trio QMP client take longer to import than an ``exec:``
helper takes to start): connect and negotiate (``qmp._sync``), check that QEMU waits for
a migration, open the image and start the pipeline on a thread, and once its first
verified buffer is ready, hand QEMU the pipe (capabilities, ``getfd``,
``migrate-incoming fd:NAME``). While QEMU loads, :func:`follow` polls it, still
without trio (the import would take CPU and the GIL from the stream). Then
:func:`~._restore_vm.resume_restore` adopts the connection under trio and finishes as
``restore_vm`` does; whatever failed here is unwound there, by the same code. The
guarantees are ``restore_vm``'s (see its module): an image refused at its start leaves
QEMU untouched, and so on.

Signals: until the hand-over starts, SIGTERM/SIGINT/SIGHUP raise
:class:`~vmtransport.Interrupted` here as anywhere in the command line. From then on they
are deferred: noted, not raised (every call has a deadline; :func:`follow` stops at
the next poll), and raised again once the trio phase listens, which then unwinds as
for any signal. A signal that interrupted the wait for the first buffer is deferred
the same way. (Not a blocked signal mask: the pipeline's threads would take the signal,
and Python would still run the handler in this thread.)
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from ._errors import Interrupted, UsageError, VMTransportError
from ._io import FdSink
from ._transport import Sink, Transport

TYPE_CHECKING = False  # not typing's: this runs before QEMU has its stream
if TYPE_CHECKING:
    import signal as _signal

    from ._pipeline import PumpStats
    from ._progress import Reporter
    from ._usecases import RestorePipeline
    from .qmp._sync import SyncQMP
else:
    import _signal  # not signal: its import pulls in enum

#: Capabilities a restore wants on; every other is off (a capability that changes the
#: stream's format, mapped-ram or multifd, would make QEMU misread a plain stream).
#: libvirt sets ``events`` alone too, and no migration parameter (a destination has
#: none that matters to a plain stream).
WANTED_CAPABILITIES: Final = {"events": True}
#: Where a restore refused before QEMU got a byte leaves QEMU.
UNTOUCHED: Final = "QEMU untouched: still waiting for a migration"
#: The signals the command line turns into Interrupted (see ``_errors``).
SIGNALS: Final = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)
_deferred: list[int] = []  # signals noted while deferred, in order

_names = itertools.count(1)


class HandOver(Sink):
    """The pipe to QEMU, whose first write waits until QEMU holds its read end (or the
    restore gives up): so an image refused before its first verified byte never
    touches QEMU. ``wanted`` is called (from the writer thread) once the first
    verified buffer waits."""

    def __init__(self, inner: FdSink, wanted: Callable[[], None]) -> None:
        self.inner = inner
        self.wanted = wanted
        self._go = threading.Event()
        self._open = False
        self.asked = False  # the pipeline has a first byte for QEMU

    def open(self) -> None:
        """QEMU reads the pipe: let the writes through."""
        self._open = True
        self._go.set()

    def close(self) -> None:
        self._go.set()

    def write(self, data: memoryview) -> None:
        if not self.asked:
            self.asked = True
            self.wanted()
            self._go.wait()
        if not self._open:
            raise Interrupted(f"{self.inner.label}: cancelled before QEMU took the stream")
        self.inner.write(data)

    def commit(self) -> None:
        self.inner.commit()

    def abort(self) -> None:
        self.inner.abort()

    def cancel(self) -> None:
        self._go.set()
        self.inner.cancel()


def pipe_to_qemu(monitor: str, wanted: Callable[[], None]) -> tuple[HandOver, int]:
    """The restore's pipe: (its write end as a sink, its read end for QEMU)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        # QEMU reads the pipe with readv, a copy: lending it our pages is safe.
        out = FdSink(w, f"the migration stream to {monitor}", confirm=True, lend=True)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return HandOver(out, wanted), r


def check_waiting(monitor: str, status: str, migration: str) -> None:
    """UsageError unless QEMU (run state ``status``, ``query-migrate``'s ``migration``)
    waits for an incoming migration that has not begun."""
    if status != "inmigrate":
        raise UsageError(
            f"QMP monitor {monitor}: QEMU is {status}, not waiting for a migration "
            "(start it with -incoming defer)"
        )
    if migration != "none":
        raise UsageError(
            f"QMP monitor {monitor}: QEMU's incoming migration is already {migration} "
            "(start it with -incoming defer)"
        )


def refused_incoming(monitor: str, desc: str) -> UsageError:
    return UsageError(
        f"QMP monitor {monitor}: QEMU refused migrate-incoming: {desc} "
        "(start it with -incoming defer)"
    )


def untouched(exc: BaseException) -> None:
    """The restore failed before QEMU had anything: say so in the error's message."""
    if isinstance(exc, VMTransportError) and len(exc.args) == 1:
        exc.args = (f"{exc.args[0]} ({UNTOUCHED})",)


class Running:
    """:meth:`Pipeline.run` on a thread of its own (for a source read by threads: no
    event loop needed), with a callback when it ends."""

    def __init__(self, pipeline: RestorePipeline, on_end: Callable[[], None]) -> None:
        self.pipeline = pipeline
        self.stats: PumpStats | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._done = False
        self._callbacks = [on_end]
        thread = threading.Thread(target=self._run, name="vmtransport-restore", daemon=True)
        thread.start()

    def _run(self) -> None:
        try:
            self.stats = self.pipeline.run()
        except BaseException as exc:
            self.error = exc
        with self._lock:
            self._done = True
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the pipeline's thread, or now) once the run ended."""
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback()

    def result(self) -> PumpStats:
        if self.error is not None:
            raise self.error
        assert self.stats is not None
        return self.stats


@dataclass
class Early:
    """What :func:`prepare` did, for the trio phase to carry on from."""

    conn: SyncQMP
    uri: str
    sink: HandOver
    r: int | None  # the pipe's read end, until QEMU holds it
    pipeline: RestorePipeline
    #: the pipeline, started on its thread; None for a source that needs the event loop
    running: Running | None = None
    wanted: bool = False  # the first verified buffer was ready: the hand-over began
    fdname: str = ""
    handed: bool = False  # QEMU holds the read end under fdname (getfd)
    incoming: bool = False  # migrate-incoming was accepted
    capabilities: dict[str, bool] = field(default_factory=dict)  # changed: old values
    error: BaseException | None = None  # the hand-over's error, for the trio phase
    deferred: bool = False  # signals are noted, not raised (see the module)


class Refused(Exception):
    """:func:`prepare` refused the image before QEMU got anything (QEMU untouched, the
    pipe closed): ``error`` is why."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _note(signum: int, frame: object) -> None:
    if signum not in _deferred:
        _deferred.append(signum)


def defer_signals() -> None:
    """From now on, note the signals instead of raising Interrupted."""
    for sig in SIGNALS:
        _signal.signal(sig, _note)


def deliver_deferred() -> None:
    """Raise the noted signals again, for the handler in place now (trio's)."""
    while _deferred:
        _signal.raise_signal(_deferred.pop(0))


def prepare(monitor: str, uri: str, *, progress: Reporter | None = None) -> Early:
    """Connect to QMP ``monitor``, check that QEMU waits, open ``uri`` and, once the
    first verified buffer is ready, hand QEMU the pipe. Raises what went wrong before
    the image was opened (no QMP connection, QEMU not waiting: nothing to undo) and
    :class:`Refused` when the image was refused at its start; anything later is in the
    returned :class:`Early` for :func:`~._restore_vm.resume_restore` to unwind.

    The image is opened and read while QEMU accepts the connection and answers the
    first commands (one write, one round trip), but the errors come in
    ``restore_vm``'s order: the monitor's, QEMU not waiting, then the image's."""
    from .qmp._sync import open_sync

    conn = open_sync(monitor)
    want = threading.Event()
    try:
        sink, r = pipe_to_qemu(monitor, want.set)
    except BaseException:
        conn.close()
        raise
    refused: BaseException | None = None
    running: Running | None = None
    try:
        from ._usecases import restore_pipeline

        pipeline = restore_pipeline(uri, sink)
        # Open the source now: a missing file fails here, QEMU untouched.
        transport = pipeline.source
        if isinstance(transport, Transport):
            threaded = transport.open_threaded_source()
            if threaded is not None:
                pipeline.source = threaded
        if progress is not None:
            progress.attach(pipeline)
        if not isinstance(pipeline.source, Transport):
            running = Running(pipeline, want.set)
    except BaseException as exc:
        refused = exc
    if isinstance(refused, Interrupted):  # a signal: no point in asking QEMU first
        sink.abort()
        os.close(r)
        conn.close()
        raise Refused(refused)  # (the command line says where it left QEMU)
    try:
        status, migration, capabilities = conn.negotiate(
            ("query-status", None), ("query-migrate", None), ("query-migrate-capabilities", None)
        )
        check_waiting(monitor, str(status["status"]), str(migration.get("status", "none")))
    except BaseException:
        conn.close()
        sink.close()  # the pipeline's first write fails: QEMU never had the pipe
        if running is not None:
            running.pipeline.cancel()  # its writer thread aborts the sink
        else:
            sink.abort()
        os.close(r)
        raise
    if refused is not None:
        sink.abort()
        os.close(r)
        conn.close()
        untouched(refused)
        raise Refused(refused)
    early = Early(conn, uri, sink, r, pipeline, running)
    if running is None:
        return early  # read on the event loop: the trio phase opens it and hands over
    try:
        want.wait()
        if not sink.asked:
            return early  # the pipeline ended before its first byte: its error says why
        early.wanted = True
        defer_signals()
        early.deferred = True
        _hand_over(early, monitor, capabilities)
    except Interrupted as exc:
        if exc.signum is None:
            raise
        # A signal: deferred, for the trio phase (its listener cancels the restore).
        defer_signals()
        early.deferred = True
        _note(exc.signum, None)
    except BaseException as exc:
        early.error = exc
    return early


#: Seconds between two ``query-migrate`` while QEMU loads (as the trio phase polls).
POLL_INTERVAL: Final = 0.1
#: Seconds a poll may wait for its reply before the trio phase takes over.
POLL_TIMEOUT: Final = 5.0


def follow(early: Early, progress: Reporter | None = None) -> None:
    """While QEMU loads, watch it without trio: importing trio now would take CPU and
    the GIL from the stream QEMU waits for (the import costs more than an ``exec:``
    helper's whole start-up). Polls ``query-migrate`` (QEMU's states to ``progress``)
    until the pipeline ends, QEMU's load ends or fails, the monitor does not answer in
    time, or a signal was noted; the trio phase then goes on from there (it polls
    again, unwinds if need be, and sets the VM's run state)."""
    running = early.running
    if running is None or not early.incoming or early.error is not None:
        return
    ended = threading.Event()
    running.when_done(ended.set)
    while not _deferred:
        try:
            info = early.conn.execute("query-migrate", timeout=POLL_TIMEOUT)
        except VMTransportError:
            return
        status = info.get("status")
        if progress is not None and isinstance(status, str):
            progress.qemu_state(status)
        if status in ("completed", "failed", "cancelled") or ended.wait(POLL_INTERVAL):
            return


def _hand_over(early: Early, monitor: str, capabilities: list[dict[str, Any]]) -> None:
    """``restore_vm``'s hand-over, blocking: the capabilities a restore wants (the old
    values of those changed kept, as ``_orchestration._Settings`` keeps them; QEMU's
    ``capabilities`` as queried before), QEMU given the read end, ``migrate-incoming``;
    then the pipeline may write."""
    conn = early.conn
    change = []
    for cap in capabilities:
        name, state = cap["capability"], bool(cap["state"])
        want = WANTED_CAPABILITIES.get(name, False)
        if state != want:
            change.append({"capability": name, "state": want})
            early.capabilities[name] = state
    if change:
        conn.execute("migrate-set-capabilities", {"capabilities": change})
    assert early.r is not None
    early.fdname = f"vmtransport-{os.getpid()}-h{next(_names)}"
    conn.getfd(early.r, early.fdname)
    early.handed = True
    os.close(early.r)  # QEMU's copy is the only reader: its exit breaks our pipe
    early.r = None
    from ._errors import QMPError

    try:
        conn.execute("migrate-incoming", {"uri": f"fd:{early.fdname}"})
    except QMPError as exc:
        raise refused_incoming(monitor, exc.desc) from None
    early.incoming = True
    early.handed = False  # migrate-incoming took the named descriptor
    early.sink.open()
