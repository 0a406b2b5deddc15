"""QMP-driven restores: what ``virsh restore`` does, into a QEMU started with
``-incoming defer``.

:func:`restore_vm` pumps the image through the very pipeline an ``exec:`` restore uses
(:func:`~._usecases.restore_pipeline`: the verifying reader holds the device state
back until the image's checksum holds), its output the write end of a pipe whose read
end QEMU gets (``getfd`` + ``migrate-incoming fd:NAME``). QEMU is handed the pipe only
when the first verified byte is ready: an image refused at its start (not an image, a
partial one, a damaged setup, a missing file) leaves QEMU untouched, still waiting for
a migration. A failure later cuts the stream short before QEMU's EOF marker, so QEMU's
load fails (QEMU then exits: its policy for a failed incoming migration) and the VM
never runs; the error is the pipeline's (the image's damage), not the broken pipe's.

Once QEMU reports ``completed``, the VM runs or stays paused as the image recorded
(``vm.runstate`` of a ``--qmp`` save, else the stream's own ``globalstate``), unless
``state`` overrides it, as ``virsh restore --running/--paused`` do.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import trio

from . import _log
from ._errors import (
    Interrupted,
    MigrationError,
    QMPConnectionError,
    QMPError,
    UsageError,
    VMTransportError,
)
from ._failover import find_pairs
from ._handoff import UNTOUCHED as UNTOUCHED  # (moved there; still named here)
from ._handoff import WANTED_CAPABILITIES as WANTED_CAPABILITIES
from ._handoff import (
    Early,
    HandOver,
    Running,
    check_waiting,
    deliver_deferred,
    pipe_to_qemu,
    refused_incoming,
    untouched,
)
from ._orchestration import (
    COMPLETION_WAIT,
    POLL_INTERVAL,
    Figures,
    _fdnames,
    _Settings,
    on_monitor,
    reported,
)
from ._pipeline import Progress, PumpStats, StateEvent
from ._progress import Reporter
from ._registry import Registry
from ._transport import Transport
from ._usecases import RestorePipeline, restore_pipeline
from .qmp import EventListener, QMPClient

RunState = Literal["running", "paused"]
STATES: Final = ("running", "paused")

#: Seconds QEMU may take, once its stream was cut short, to fail its load (and exit).
FAIL_WAIT: Final = 10.0
#: Seconds the image may still take to be read to its end after QEMU refused it (the
#: error then names the image's damage, if any, rather than QEMU's refusal).
VERIFY_WAIT: Final = 60.0
#: Seconds QEMU may take to leave ``inmigrate`` once its migration completed.
SETTLE_WAIT: Final = 10.0
#: Seconds a failover primary may take to be plugged once the load completed (QEMU
#: plugs it while it loads the standby's negotiated features: ``FAILOVER_NEGOTIATED``).
FAILOVER_TIMEOUT: Final = 10.0


@dataclass(frozen=True)
class RestoreResult(Figures):
    """What :func:`restore_vm` restored, how fast, and in which state the VM ended."""

    uri: str
    stats: PumpStats  #: bytes read from ``uri`` (an image's header too), the pump's seconds
    recorded: str  #: the run state the image recorded ("" if none)
    #: where: "vm" (a --qmp save's metadata), "libvirt" (its header's was_running),
    #: "stream" (the stream's globalstate), or ""
    recorded_by: str
    state: str  #: what was asked: "running", "paused", or "" (as recorded)
    runstate: str  #: the VM's run state at the end: "running", "paused", "prelaunch"...
    image: Mapping[str, Any] = field(default_factory=dict)  #: the image's metadata
    migration: Mapping[str, Any] = field(default_factory=dict)  #: QEMU's final query-migrate
    #: failover primaries plugged on the destination (docs/failover.md), and those the
    #: image's pairs named that were not within the timeout
    failover: tuple[str, ...] = ()
    failover_missing: tuple[str, ...] = ()


def recorded_runstate(pipeline: RestorePipeline) -> tuple[str, str]:
    """(run state, where it was found) of what the restore read: a ``--qmp`` save's
    ``vm.runstate`` (the VM before the save stopped it; ``paused`` if saved with
    ``--pause-vm``), a libvirt image's
    ``was_running`` (likewise: ``virsh save`` stops the VM first), else the stream's
    globalstate."""
    reader = pipeline.reader
    if reader.libvirt is not None:
        return ("running" if reader.libvirt.was_running else "paused"), "libvirt"
    if reader.header is not None:
        vm = reader.header.metadata.get("vm")
        state = vm.get("runstate") if isinstance(vm, dict) else None
        if isinstance(vm, dict) and vm.get("pause_vm") is True:
            return "paused", "vm"  # saved with --pause-vm: the VM pauses as it migrates
        if isinstance(state, str) and state:
            return state, "vm"
    state = reader.parser.runstate
    return (state, "stream") if state else ("", "")


async def restore_vm(
    monitor: QMPClient | str | os.PathLike[str],
    uri: str,
    *,
    state: RunState | None = None,
    registry: Registry | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_event: Callable[[StateEvent], None] | None = None,
    report: Callable[[str], None] | None = None,
    progress: Reporter | None = None,
    failover_timeout: float = FAILOVER_TIMEOUT,
) -> RestoreResult:
    """Restore the image (or raw stream, or libvirt save image) at ``uri`` into the
    QEMU behind QMP ``monitor`` (a connected client, or its socket's path), which must
    wait for it: started with ``-incoming defer``, ``migrate-incoming`` not yet given.

    The VM then runs if the image recorded a running VM, else stays paused; ``state``
    (``"running"`` or ``"paused"``) overrides that. Capabilities changed for the restore
    are put back. ``on_progress`` and ``on_event`` observe the pipeline (called from its
    writer thread, as :meth:`Pipeline.on_progress` says).

    Raises :class:`~vmtransport.UsageError` (bad ``state``; QEMU not waiting for an
    incoming migration), the pipeline's errors (``StreamError`` for a damaged image,
    :class:`~vmtransport.TransportError`), :class:`~vmtransport.MigrationError` (QEMU's
    load failed), QMP errors. A failed or cancelled restore never lets the VM run; the
    error's message ends with where it left QEMU, and ``report`` gets that too.

    ``progress``, if given (``docs/events.md``), is started and gets the pipeline's
    progress and states, QEMU's ``query-migrate`` states, the VM's final run state,
    then the ``result`` or the ``error`` of a :class:`~vmtransport.VMTransportError`.

    Failover primaries QEMU plugs on the destination while it loads (docs/failover.md)
    are reported; those the image names are waited for, ``failover_timeout`` seconds
    at most (a warning, not an error, if one does not come).
    """
    if state is not None and state not in STATES:
        raise UsageError(f"state={state!r}: must be one of {', '.join(STATES)}")
    result = await reported(
        progress,
        "restore",
        monitor,
        uri,
        report,
        lambda tell: on_monitor(
            monitor,
            lambda client: _restore(
                client, uri, state, registry, on_progress, on_event, tell, progress,
                failover_timeout,
            ),
        ),
    )
    if progress is not None:
        _result(progress, result)
    return result


def _result(progress: Reporter, result: RestoreResult) -> None:
    progress.state("vm", result.runstate)
    extra = {}
    if result.failover or result.failover_missing:
        extra = {"failover": result.failover, "failover_missing": result.failover_missing}
    progress.result(
        bytes=result.bytes, seconds=result.seconds, uri=result.uri, vm=result.runstate, **extra
    )


async def _restore(
    client: QMPClient,
    uri: str,
    state: RunState | None,
    registry: Registry | None,
    on_progress: Callable[[Progress], None] | None,
    on_event: Callable[[StateEvent], None] | None,
    report: Callable[[str], None] | None,
    progress: Reporter | None,
    failover_timeout: float,
) -> RestoreResult:
    status = str((await client.execute("query-status"))["status"])
    migration = (await client.execute("query-migrate")).get("status", "none")
    check_waiting(client.monitor, status, str(migration))
    wanted = trio.Event()
    sink, r = pipe_to_qemu(client.monitor, _setter(wanted))
    session = _Session(client, sink, r, report)
    session.failover_timeout = failover_timeout
    try:
        pipeline = await trio.to_thread.run_sync(
            lambda: restore_pipeline(uri, sink, registry=registry)
        )
        await _open_source(pipeline)
    except BaseException as exc:
        _refused(exc, session)
        raise
    if on_progress is not None:
        pipeline.on_progress(on_progress)
    if on_event is not None:
        pipeline.on_event(on_event)
    if progress is not None:
        progress.attach(pipeline)
        session.progress = progress
    return await session.run(pipeline, uri, state, wanted)


def _setter(event: trio.Event) -> Callable[[], None]:
    """``event.set`` for another thread (the pipeline's writer) to call."""
    token = trio.lowlevel.current_trio_token()

    def wake() -> None:
        try:
            token.run_sync_soon(event.set)
        except trio.RunFinishedError:
            pass

    return wake


async def _open_source(pipeline: RestorePipeline) -> None:
    """Open the source now: a missing file fails here, QEMU untouched."""
    transport = pipeline.source
    if isinstance(transport, Transport):
        threaded = await trio.to_thread.run_sync(transport.open_threaded_source)
        pipeline.source = threaded if threaded is not None else await transport.open_source()


def _refused(exc: BaseException, session: _Session) -> None:
    """The image was refused before the pipeline ran: nothing reached QEMU."""
    session.sink.abort()
    session.close_r()
    untouched(exc)
    if session.report is not None:
        session.report(UNTOUCHED)


async def resume_restore(
    early: Early,
    *,
    state: RunState | None = None,
    report: Callable[[str], None] | None = None,
    progress: Reporter | None = None,
    failover_timeout: float = FAILOVER_TIMEOUT,
) -> RestoreResult:
    """Finish the restore :func:`~._handoff.prepare` began (the command line's fast
    start), as :func:`restore_vm` would have from there: the connection adopted, the
    pipeline followed until QEMU's load completes, the run state and capabilities set;
    or, if the hand-over failed or a signal came, unwound as ``restore_vm`` unwinds.
    Deferred signals are raised again once this runs: the caller's signal handling
    (``run_trio``'s) must be in place by then. ``progress`` was started and attached."""
    if state is not None and state not in STATES:
        raise UsageError(f"state={state!r}: must be one of {', '.join(STATES)}")
    async with QMPClient.adopt(early.conn) as client:
        result = await reported(
            progress,
            "restore",
            client,
            early.uri,
            report,
            lambda tell: _resume(client, early, state, tell, progress, failover_timeout),
        )
    if progress is not None:
        _result(progress, result)
    return result


async def _resume(
    client: QMPClient,
    early: Early,
    state: RunState | None,
    report: Callable[[str], None] | None,
    progress: Reporter | None,
    failover_timeout: float,
) -> RestoreResult:
    session = _Session(client, early.sink, early.r, report)
    session.progress = progress
    session.failover_timeout = failover_timeout
    session.fdname = early.fdname or session.fdname
    session.handed, session.incoming = early.handed, early.incoming
    session.settings.capabilities = dict(early.capabilities)
    wanted = trio.Event()
    pipeline = early.pipeline
    if early.deferred:
        deliver_deferred()  # a deferred signal cancels this task now
        await trio.lowlevel.checkpoint()
    running = early.running
    if running is None:  # a source read on the event loop: restore_vm's way from here
        early.sink.wanted = _setter(wanted)
        try:
            await _open_source(pipeline)
        except BaseException as exc:
            _refused(exc, session)
            raise
        return await session.run(pipeline, early.uri, state, wanted)
    if early.wanted or early.error is not None:
        wanted.set()
    error = early.error

    async def handed_over() -> None:  # by prepare(): raise what went wrong there
        if error is not None:
            raise error

    session.hand_over = handed_over
    return await session.run(pipeline, early.uri, state, wanted, pump=lambda: _joined(running))


async def _joined(running: Running) -> PumpStats:
    """The pipeline ``running`` on its thread, to its end; cancelling cancels it (as
    :meth:`Pipeline.run_async`: back within its CANCEL_WAIT even if a write is stuck)."""
    done = trio.Event()
    running.when_done(_setter(done))
    try:
        await done.wait()
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(running.pipeline.cancel)
        raise
    return running.result()


class _Session:
    """One restore's moving parts, so that every failure unwinds the same way."""

    def __init__(
        self,
        client: QMPClient,
        sink: HandOver,
        r: int | None,
        report: Callable[[str], None] | None,
    ) -> None:
        self.client = client
        self.sink = sink
        self.r: int | None = r
        self.report = report
        self.settings = _Settings(client, WANTED_CAPABILITIES, {})
        self.fdname = f"vmtransport-{os.getpid()}-{next(_fdnames)}"
        self.handed = False  # QEMU holds the read end under fdname (getfd)
        self.incoming = False  # migrate-incoming was accepted
        self.stats: PumpStats | None = None
        self.pump_error: BaseException | None = None
        self.outcome = ""  # where a failure left QEMU, for the error message
        self.progress: Reporter | None = None
        #: hands QEMU the pipe once the first buffer is ready
        self.hand_over: Callable[[], Awaitable[None]] = self._hand_over
        # From the start: QEMU says so while it loads the stream. (None: the monitor
        # is gone already, as after QEMU refused the stream: the load is what fails.)
        self.negotiated: EventListener | None = None
        with contextlib.suppress(QMPConnectionError):
            self.negotiated = client.listen("FAILOVER_NEGOTIATED")
        self.failover_timeout = FAILOVER_TIMEOUT

    def close_r(self) -> None:
        if self.r is not None:
            os.close(self.r)
            self.r = None

    async def run(
        self,
        pipeline: RestorePipeline,
        uri: str,
        state: RunState | None,
        wanted: trio.Event,
        *,
        pump: Callable[[], Awaitable[PumpStats]] | None = None,
    ) -> RestoreResult:
        try:
            info = await self._load(pump or pipeline.run_async, wanted)
        except VMTransportError as exc:
            if self.outcome and len(exc.args) == 1:
                exc.args = (f"{exc.args[0]} ({self.outcome})",)
            raise
        finally:
            self.close_r()
            if self.stats is None and self.negotiated is not None:
                self.negotiated.close()
        assert self.stats is not None
        client = self.client
        recorded, recorded_by = recorded_runstate(pipeline)
        try:
            runstate = await _settled(client)
            run = state == "running" if state is not None else recorded == "running"
            if run and runstate != "running":
                await client.execute("cont")
            elif not run and runstate == "running":
                # QEMU started it itself: no -S, and the stream said running.
                await client.execute("stop")
            await self.settings.restore()
            runstate = str((await client.execute("query-status"))["status"])
            header = pipeline.reader.header
            metadata = dict(header.metadata) if header is not None else {}
            plugged, missing = await self._failover(metadata)
        except BaseException:
            if self.report is not None:
                self.report("the VM is loaded, its run state as QEMU reports it")
            raise
        finally:
            if self.negotiated is not None:
                self.negotiated.close()
        return RestoreResult(
            uri,
            self.stats,
            recorded,
            recorded_by,
            state or "",
            runstate,
            metadata,
            info,
            plugged,
            missing,
        )

    async def _failover(
        self, metadata: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The failover primaries QEMU plugged on the destination: it does so when it
        loads a standby whose guest driver had negotiated STANDBY, and says so with
        ``FAILOVER_NEGOTIATED`` (until then a destination's primary is hidden: no QOM
        object). Waits up to :attr:`failover_timeout` for those the image's pairs name
        (``vm.failover``), reports each, and warns about any that did not come: the VM
        runs all the same, without that NIC until its driver renegotiates. Returns
        (plugged, missing)."""
        vm = metadata.get("vm")
        pairs = vm.get("failover") if isinstance(vm, Mapping) else None
        wanted = [
            str(p["primary"])
            for p in (pairs if isinstance(pairs, list) else [])
            if isinstance(p, Mapping) and isinstance(p.get("primary"), str)
        ]
        plugged: list[str] = []
        negotiated = self.negotiated is not None and self.negotiated.get_nowait() is not None
        if not wanted and not negotiated:
            return (), ()  # no pair named, none negotiated: nothing to look for
        deadline = trio.current_time() + self.failover_timeout
        while True:
            for pair in await find_pairs(self.client):
                if pair.primary is not None and pair.primary not in plugged:
                    plugged.append(pair.primary)
                    if self.progress is not None:
                        self.progress.state(
                            "failover", "negotiated",
                            detail=f"{pair.primary} plugged (standby {pair.standby} negotiated)",
                        )  # fmt: skip
            missing = [p for p in wanted if p not in plugged]
            if not missing or trio.current_time() >= deadline:
                break
            with trio.move_on_after(min(0.1, deadline - trio.current_time())):
                if self.negotiated is not None:  # FAILOVER_NEGOTIATED wakes us at once
                    await self.negotiated.receive()
                else:
                    await trio.sleep_forever()
        if missing:
            ids = ", ".join(missing)
            if self.progress is not None:
                self.progress.state("failover", "not-negotiated", detail=f"{ids} not plugged")
            _log.warning(
                "%s: failover primary %s not plugged within %g s: the VM runs without it "
                "until its guest driver renegotiates the standby",
                self.client.monitor, ids, self.failover_timeout,
            )  # fmt: skip
        return tuple(plugged), tuple(missing)

    async def _load(
        self, run: Callable[[], Awaitable[PumpStats]], wanted: trio.Event
    ) -> dict[str, Any]:
        """Pump; hand QEMU the pipe once the first byte is ready; follow QEMU's load
        until completed. On failure, make sure QEMU's load fails and say where QEMU is."""
        pump_done = trio.Event()
        error: BaseException | None = None
        info: dict[str, Any] = {}

        async def pump() -> None:
            try:
                self.stats = await run()
            except Exception as exc:
                self.pump_error = exc
            finally:
                pump_done.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump)
                try:
                    async with trio.open_nursery() as first:

                        async def ended() -> None:
                            await pump_done.wait()
                            first.cancel_scope.cancel()

                        async def ready() -> None:
                            await wanted.wait()
                            first.cancel_scope.cancel()

                        first.start_soon(ended)
                        first.start_soon(ready)
                    if wanted.is_set():
                        await self.hand_over()
                        info = await self._follow(pump_done)
                    await pump_done.wait()
                    if self.pump_error is not None:
                        raise self.pump_error
                    if not info:  # a stream with nothing for QEMU cannot be; be safe
                        raise MigrationError(f"{self.client.monitor}: QEMU was sent nothing")
                except BaseException as exc:
                    error = exc  # kept: out of a nursery it would come wrapped in a group
                    nursery.cancel_scope.cancel()
                finally:
                    self.sink.close()
        except BaseException as exc:
            # The pump task's own Cancelled when the whole run was cancelled.
            error = error or exc
        if error is not None:
            with trio.CancelScope(shield=True):
                await self._unwind()
            cancelled = isinstance(error, Interrupted | trio.Cancelled)
            damage = self.pump_error
            if damage is not None and not cancelled and not isinstance(damage, Interrupted):
                # The image's own damage, not what it did to QEMU (a broken pipe, a
                # monitor that closed as QEMU exited).
                error = damage
            raise error
        return info

    async def _hand_over(self) -> None:
        client = self.client
        await self.settings.apply()
        assert self.r is not None
        await client.getfd(self.r, self.fdname)
        self.handed = True
        self.close_r()  # QEMU's copy is the only reader: its exit breaks our pipe
        try:
            await client.execute("migrate-incoming", {"uri": f"fd:{self.fdname}"})
        except QMPError as exc:
            raise refused_incoming(client.monitor, exc.desc) from None
        self.incoming = True
        self.handed = False  # migrate-incoming took the named descriptor
        self.sink.open()

    async def _follow(self, pump_done: trio.Event) -> dict[str, Any]:
        """Watch QEMU's load until it completes; raise if it fails or the pump does."""
        ended_at: float | None = None
        while True:
            if self.pump_error is not None:
                raise self.pump_error
            try:
                info: dict[str, Any] = await self.client.execute("query-migrate")
            except QMPConnectionError:
                if (damage := await self._pump_verdict(pump_done)) is not None:
                    raise damage from None
                raise
            status = info.get("status")
            if self.progress is not None and isinstance(status, str):
                self.progress.qemu_state(status)
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                if (damage := await self._pump_verdict(pump_done)) is not None:
                    raise damage
                why = info.get("error-desc") or status
                raise MigrationError(
                    f"QMP monitor {self.client.monitor}: QEMU's load {status}: {why}"
                )
            if not pump_done.is_set():
                with trio.move_on_after(POLL_INTERVAL):
                    await pump_done.wait()
                continue
            now = time.monotonic()
            ended_at = now if ended_at is None else ended_at
            if now - ended_at > COMPLETION_WAIT:
                raise MigrationError(
                    f"QMP monitor {self.client.monitor}: QEMU took the whole stream but its "
                    f"migration is still {status} after {COMPLETION_WAIT:g} s"
                )
            await trio.sleep(0.01)

    async def _pump_verdict(self, pump_done: trio.Event) -> BaseException | None:
        """QEMU failed its load: let the pipeline read the image to its end (bounded),
        so that the error names the image's damage if it has some; the pump's error."""
        with trio.move_on_after(VERIFY_WAIT):
            await pump_done.wait()
        return self.pump_error

    async def _unwind(self) -> None:
        """After a failure: QEMU's load must fail (the pipe is closed by now, short of
        the EOF marker), the named descriptor and the capabilities go back. Bounded,
        never raises; sets :attr:`outcome`."""
        client = self.client
        outcome = ""
        with trio.move_on_after(FAIL_WAIT + 5) as scope:
            try:
                if self.handed:
                    try:
                        await client.closefd(self.fdname)
                    except QMPError:
                        pass
                if not self.incoming:
                    await self.settings.restore()
                    outcome = UNTOUCHED
                else:
                    outcome = await self._failed_load()
            except QMPConnectionError:
                outcome = "QEMU exited; the VM never ran"
            except QMPError as exc:
                outcome = f"QEMU's state is unknown: {exc}"
        if scope.cancelled_caught:
            outcome = f"QEMU's state is unknown: no answer within {FAIL_WAIT + 5:g} s"
        self.outcome = outcome
        if self.report is not None:
            self.report(outcome)

    async def _failed_load(self) -> str:
        """Wait until QEMU's load has failed (it usually exits); where that left it."""
        client = self.client
        deadline = time.monotonic() + FAIL_WAIT
        while True:
            info = await client.execute("query-migrate")
            status = str(info.get("status", "none"))
            runstate = str((await client.execute("query-status"))["status"])
            if status in ("failed", "cancelled"):
                try:
                    await self.settings.restore()
                except QMPError:
                    pass
                return f"QEMU's load {status}; QEMU is {runstate}, the VM never ran"
            if status == "completed":  # cannot be: QEMU never had the EOF marker
                if runstate == "running":
                    await client.execute("stop")
                    runstate = "paused"
                return f"QEMU's load completed nonetheless; the VM is {runstate}"
            if time.monotonic() > deadline:
                return f"QEMU's load still {status} after {FAIL_WAIT:g} s; QEMU is {runstate}"
            await trio.sleep(0.05)


async def _settled(client: QMPClient) -> str:
    """QEMU reports completed around the time it leaves ``inmigrate``: wait for the run
    state that follows (paused, prelaunch, or running if QEMU started the VM itself)."""
    with trio.move_on_after(SETTLE_WAIT):
        while True:
            status = str((await client.execute("query-status"))["status"])
            if status != "inmigrate":
                return status
            await trio.sleep(0.01)
    _log.warning("QMP monitor %s: still inmigrate after the load completed", client.monitor)
    return "inmigrate"
