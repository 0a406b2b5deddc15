"""QMP-driven saves: vmtransport as the management tool (what ``virsh save`` does).

:func:`save_vm` hands QEMU the write end of a pipe (``getfd`` + ``migrate fd:NAME``) and
pumps the read end through the very pipeline an ``exec:`` save uses (validation, image
format, transports). Around it, the run-state policy: a running VM is stopped first, so
the image is one consistent pass of RAM; ``after`` says what becomes of it once the
image is complete. On any failure or cancellation the migration is cancelled, QEMU's
pipe drained so it can notice, every migration capability and parameter put back, and
the VM resumed if this function stopped it; no image is left under the final name
(the pipeline aborts its sink).

This layer sits above the use cases and below the CLI; the QMP client knows nothing of it.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

import trio

from . import _log
from ._buffers import BlockingReader, fd_reader
from ._errors import MigrationError, QMPConnectionError, QMPError, UsageError, VMTransportError
from ._failover import FailoverPair, find_pairs, names, plug_generation
from ._pipeline import PumpStats
from ._progress import Reporter, image_path
from ._registry import Registry
from ._usecases import SavePipeline, save_pipeline
from .image import ImageWriter
from .qmp import Event, EventListener, QMPClient, connect

T = TypeVar("T")

After = Literal["pause", "resume", "quit"]
AFTER: Final = ("pause", "resume", "quit")

#: QEMU's ``max-bandwidth`` for a save: libvirt's "unlimited" (INT64_MAX rounded down
#: to MiB/s, in bytes/s), which both QEMU 7.2 and 10.0 accept. QEMU's default, 128 MiB/s,
#: would make the save crawl.
UNLIMITED_BANDWIDTH: Final = ((1 << 63) - 1) >> 20 << 20
#: The migration parameters a save sets (and puts back). ``downtime-limit`` 1 ms: QEMU
#: then streams RAM in its active phase, not in the completion phase it enters once
#: what is left fits the limit. A failure in the active phase leaves the source's run
#: state as it was; one in the completion phase leaves a VM that was not running in
#: ``postmigrate``, from which QEMU refuses a new migration until ``cont``. The VM is
#: stopped anyway, so the limit costs nothing.
WANTED_PARAMETERS: Final = {"max-bandwidth": UNLIMITED_BANDWIDTH, "downtime-limit": 1}
#: Capabilities a save wants on: ``events`` gives MIGRATION events to whoever listens.
#: Every other capability is switched off for the save: most change the stream's format
#: (multifd, compress, xbzrle, mapped-ram), need a second channel (return-path,
#: postcopy), wait for a command (pause-before-switchover) or leave out RAM
#: (x-ignore-shared, release-ram) — an image that a plain QEMU could not load.
WANTED_CAPABILITIES: Final = {"events": True}
#: While the VM still runs and QEMU waits for the guest to unplug a failover primary,
#: ``max-bandwidth`` is held at this share of RAM a second (at least
#: :data:`HOLD_BANDWIDTH_MIN`): once QEMU goes on, little RAM leaves before the save
#: stops the VM. After the stop ``downtime-limit`` goes to :data:`MAX_DOWNTIME`, and
#: QEMU completes at once, sending each page once (in a final pass it does not rate
#: limit). It completes when what is left fits ``bandwidth x downtime-limit``: at
#: RAM/1000 per second and 2000 s, twice RAM. Lifting ``max-bandwidth`` instead would
#: make QEMU send twice every page the guest dirtied while it waited (its dirty bitmap
#: was synced before the wait): docs/failover.md has the figures.
HOLD_SHARE: Final = 1000
HOLD_BANDWIDTH_MIN: Final = 1 << 20
#: QEMU's largest ``downtime-limit`` (ms).
MAX_DOWNTIME: Final = 2_000_000
#: The parameters set once the VM is stopped.
AFTER_STOP: Final = {"downtime-limit": MAX_DOWNTIME}
#: Seconds a guest gets to unplug a failover primary; generous: a real guest was not measured here.
UNPLUG_TIMEOUT: Final = 30.0
#: Seconds QEMU may stay in ``cancelling``: a cancel while the guest was asked to unplug
#: a primary waits for that unplug to end (QEMU gives the guest about 20 s more), then
#: plugs the primary back.
CANCEL_TIMEOUT: Final = 45.0
#: Seconds a rollback may take (cancel, wait for QEMU to stop writing, put back).
ROLLBACK_TIMEOUT: Final = CANCEL_TIMEOUT + 15.0
#: Seconds between two ``query-migrate`` polls while the stream flows.
POLL_INTERVAL: Final = 0.1
#: Seconds QEMU may take to report "completed" once its stream has ended.
COMPLETION_WAIT: Final = 30.0
_FINAL: Final = frozenset({"completed", "failed", "cancelled"})
_IDLE: Final = frozenset({"none", "completed", "failed", "cancelled"})
_fdnames = itertools.count(1)


@dataclass(frozen=True)
class VMFacts:
    """What QMP says about a VM before its save (kept in the image's metadata)."""

    name: str | None  #: ``-name``, or None
    qemu_version: str  #: e.g. "7.2.22"
    qemu_package: str  #: e.g. "Debian 1:7.2+dfsg-7+deb12u18+b3"
    machine_type: str  #: e.g. "pc-i440fx-7.2"
    runstate: str  #: before the save: running, paused, prelaunch...
    ram_size: int  #: bytes: base + hot-plugged memory
    failover: tuple[FailoverPair, ...] = ()  #: virtio-net failover pairs

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": self.name,
            "qemu_version": self.qemu_version,
            "qemu_package": self.qemu_package,
            "machine_type": self.machine_type,
            "runstate": self.runstate,
            "ram_size": self.ram_size,
        }
        if self.failover:
            meta["failover"] = [pair.metadata() for pair in self.failover]
        return meta


class Figures:
    """The transfer's figures, from its pump statistics (``stats``)."""

    stats: PumpStats

    @property
    def bytes(self) -> int:
        return self.stats.bytes

    @property
    def seconds(self) -> float:
        return self.stats.seconds

    @property
    def mib_per_s(self) -> float:
        return self.stats.mib_per_s


@dataclass(frozen=True)
class SaveResult(Figures):
    """What :func:`save_vm` saved, how fast, and where it left the VM."""

    uri: str
    stats: PumpStats  #: stream bytes and seconds of the pump
    vm: VMFacts
    stopped: bool  #: save_vm stopped the VM (it was running)
    after: str  #: what was done once the image was complete
    runstate: str  #: the VM's run state at the end ("" after quit)
    migration: Mapping[str, Any] = field(default_factory=dict)  #: QEMU's final query-migrate
    #: With a plugged failover primary: seconds the guest took to unplug it, and the RAM
    #: bytes QEMU sent before the VM was stopped (held back: :data:`HOLD_SHARE`).
    unplug_seconds: float | None = None
    sent_running: int | None = None


async def query_facts(client: QMPClient) -> VMFacts:
    status = await client.execute("query-status")
    name = (await client.execute("query-name")).get("name")
    version = await client.execute("query-version")
    qemu = version.get("qemu", {})
    machine = str(await client.execute("qom-get", {"path": "/machine", "property": "type"}))
    memory = await client.execute("query-memory-size-summary")
    return VMFacts(
        name=name if isinstance(name, str) else None,
        qemu_version=f"{qemu.get('major')}.{qemu.get('minor')}.{qemu.get('micro')}",
        qemu_package=str(version.get("package", "")).strip(),
        machine_type=machine.removesuffix("-machine"),  # QOM's type name for the machine
        runstate=str(status["status"]),
        ram_size=int(memory.get("base-memory", 0)) + int(memory.get("plugged-memory", 0)),
        failover=tuple(await find_pairs(client)),
    )


class _Settings:
    """The migration capabilities and parameters a save (or restore) changes, and their
    old values. Every capability not in ``capabilities`` is switched off."""

    def __init__(
        self,
        client: QMPClient,
        capabilities: Mapping[str, bool] = WANTED_CAPABILITIES,
        parameters: Mapping[str, Any] = WANTED_PARAMETERS,
    ) -> None:
        self.client = client
        self.wanted_capabilities = capabilities
        self.wanted_parameters = parameters
        self.capabilities: dict[str, bool] = {}  # name -> value before
        self.parameters: dict[str, Any] = {}  # name -> value before, for those changed
        self.current: dict[str, Any] = {}  # the parameters as QEMU has them now

    async def apply(self) -> None:
        caps = await self.client.execute("query-migrate-capabilities")
        change = []
        for cap in caps:
            name, state = cap["capability"], bool(cap["state"])
            want = self.wanted_capabilities.get(name, False)
            if state != want:
                change.append({"capability": name, "state": want})
                self.capabilities[name] = state
        self.current = dict(await self.client.execute("query-migrate-parameters"))
        if change:
            await self.client.execute("migrate-set-capabilities", {"capabilities": change})
        await self.set(self.wanted_parameters)

    async def set(self, parameters: Mapping[str, Any]) -> None:
        """Set migration ``parameters`` (those that differ), to be put back later."""
        wanted = {k: v for k, v in parameters.items() if self.current.get(k) != v}
        if wanted:
            for k in wanted:
                self.parameters.setdefault(k, self.current[k])
            await self.client.execute("migrate-set-parameters", wanted)
            self.current.update(wanted)

    async def restore(self) -> None:
        if self.parameters:
            await self.client.execute("migrate-set-parameters", self.parameters)
            self.current.update(self.parameters)
            self.parameters = {}
        if self.capabilities:
            old = [{"capability": k, "state": v} for k, v in self.capabilities.items()]
            await self.client.execute("migrate-set-capabilities", {"capabilities": old})
            self.capabilities = {}


async def _wait_settled(client: QMPClient, timeout: float = 10.0) -> str:
    """QEMU reports a migration's end before it leaves ``finish-migrate``: wait for the
    run state that follows (postmigrate, or paused after a failure)."""
    with trio.move_on_after(timeout):
        while True:
            status = str((await client.execute("query-status"))["status"])
            if status != "finish-migrate":
                return status
            await trio.sleep(0.01)
    return "finish-migrate"


async def _drain(fd: int) -> None:
    """Read and drop what QEMU still writes into the pipe, until it closes its end: a
    migration thread blocked on a full pipe cannot see a cancel (a pipe has no
    shutdown)."""
    stream = trio.lowlevel.FdStream(os.dup(fd))
    async with stream:
        try:
            while await stream.receive_some(1 << 20):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def save_vm(
    monitor: QMPClient | str | os.PathLike[str],
    uri: str,
    *,
    after: After = "pause",
    pause_vm: bool = False,
    unplug_timeout: float = UNPLUG_TIMEOUT,
    name: str | None = None,
    registry: Registry | None = None,
    report: Callable[[str], None] | None = None,
    progress: Reporter | None = None,
) -> SaveResult:
    """Save the VM behind QMP ``monitor`` (a connected client, or its socket's path) to
    ``uri``, in the image format of an ``exec:`` save, with the VM's facts from QMP in
    the image's metadata (``vm``: name, QEMU version, machine type, run state, RAM size).

    A running VM is stopped first, unless it has a plugged virtio-net failover primary
    (docs/failover.md): QEMU must first have the guest unplug it, which a stopped guest
    never does. Such a VM keeps running (RAM held back by a bandwidth limit) until the
    guest has unplugged it, at most ``unplug_timeout`` seconds, and is stopped the
    moment it has, before RAM is copied: one pass over RAM either way. ``pause_vm``
    (QEMU's never-merged ``pause-vm``) also marks the image to come up paused when
    restored. A paused, crashed or shut-down VM with a plugged primary is refused.

    Once the image is complete, ``after`` = ``pause`` leaves the VM stopped (it and its
    image cannot diverge), ``resume`` runs it again (and has QEMU plug failover
    primaries back), ``quit`` ends QEMU. Capabilities and parameters changed for the
    save are put back.

    Raises :class:`~vmtransport.UsageError` (bad ``after``, a migration already running),
    the pipeline's errors (:class:`~vmtransport.TransportError`, ``StreamError``),
    :class:`~vmtransport.MigrationError` (QEMU's migration failed or was cancelled),
    QMP errors. Whatever failed, or if the task is cancelled, the VM is rolled back as
    the module says (within :data:`ROLLBACK_TIMEOUT`; shielded from the cancel); the
    error's message ends with where that left the VM, and ``report``, if given, gets
    that too (the only way to learn it after a cancel).

    ``progress``, if given, is started and gets the pipeline's progress and states,
    QEMU's ``query-migrate`` figures and ``MIGRATION`` states and the VM's run states,
    then the ``result``, or the ``error`` of a :class:`~vmtransport.VMTransportError`
    (a cancelled task leaves the error event to the caller, who knows why).
    """

    async def job(tell: Callable[[str], None] | None) -> SaveResult:
        if after not in AFTER:
            raise UsageError(f"after={after!r}: must be one of {', '.join(AFTER)}")
        if not unplug_timeout > 0:
            raise UsageError(f"unplug_timeout={unplug_timeout!r}: must be a number of seconds > 0")
        options = _Options(after, pause_vm, unplug_timeout)
        return await on_monitor(
            monitor, lambda client: _save(client, uri, options, name, registry, tell, progress)
        )

    return await reported(progress, "save", monitor, uri, report, job)


async def on_monitor(
    monitor: QMPClient | str | os.PathLike[str], job: Callable[[QMPClient], Awaitable[T]]
) -> T:
    """``job`` on ``monitor``: a connected client (left open), or a socket's path
    (connected for the job, closed after it)."""
    if isinstance(monitor, QMPClient):
        return await job(monitor)
    async with await connect(monitor) as client:
        return await job(client)


async def reported(
    progress: Reporter | None,
    operation: str,
    monitor: QMPClient | str | os.PathLike[str],
    uri: str,
    report: Callable[[str], None] | None,
    job: Callable[[Callable[[str], None] | None], Awaitable[T]],
) -> T:
    """Run ``job(report)`` with ``progress`` (if any) started for ``operation``; a
    :class:`VMTransportError` becomes its ``error`` event, naming where the rollback
    left the VM (the last line the job reported)."""
    if progress is None:
        return await job(report)
    where = monitor.monitor if isinstance(monitor, QMPClient) else os.fspath(monitor)
    progress.start(operation, uri=uri, monitor=where)
    left: list[str] = []  # where a rollback left the VM

    def tell(line: str) -> None:
        left.append(line)
        if report is not None:
            report(line)

    try:
        return await job(tell)
    except VMTransportError as exc:
        progress.error(str(exc), vm=left[-1] if left else None, exit=exc.exit_code)
        raise


@dataclass(frozen=True)
class _Options:
    after: After
    pause_vm: bool
    unplug_timeout: float


async def _save(
    client: QMPClient,
    uri: str,
    options: _Options,
    name: str | None,
    registry: Registry | None,
    report: Callable[[str], None] | None,
    progress: Reporter | None,
) -> SaveResult:
    facts = await query_facts(client)
    if progress is not None:
        progress.state("vm", facts.runstate)
    state = (await client.execute("query-migrate")).get("status", "none")
    if state not in _IDLE:
        raise UsageError(f"QMP monitor {client.monitor}: a migration is already {state}")
    unplug = [pair for pair in facts.failover if pair.present]
    if unplug and facts.runstate != "running":
        # QEMU would wait for ever for a guest that cannot eject the card.
        raise MigrationError(
            f"QMP monitor {client.monitor}: the guest cannot unplug failover primary "
            f"{names(unplug)}: the VM is {facts.runstate}; a save must ask a running "
            f"guest to unplug it (resume the VM first)"
        )
    if progress is not None and unplug:
        progress.state("failover", "plugged", detail=f"failover primary {names(unplug)}")

    r, w = os.pipe2(os.O_CLOEXEC)
    # fd_reader grows the pipe to 1 MiB: a 64 KiB pipe caps a save near 600 MiB/s.
    label = f"the migration stream from {client.monitor}"
    reader = BlockingReader(fd_reader(r), label=label, magic=b"QEVM", checksum=True)
    built: list[SavePipeline] = []

    def build() -> SavePipeline:
        built.append(save_pipeline(uri, reader, name=name or facts.name, registry=registry))
        return built[0]

    try:
        pipeline = await trio.to_thread.run_sync(build)
    except BaseException:
        if built:  # cancelled while the target opened: it is open, and must go
            reader.discard()
            built[0].sink.abort()
        os.close(w)  # the reader thread sees EOF and ends (save_pipeline stopped it)
        with trio.CancelScope(shield=True):
            if await trio.to_thread.run_sync(reader.join, 5.0):
                os.close(r)
        raise
    if isinstance(pipeline.image, ImageWriter):
        vm = facts.metadata()
        if options.pause_vm:
            vm["pause_vm"] = True  # restore paused (unless told otherwise)
        pipeline.image.metadata["vm"] = vm
    if progress is not None:
        progress.attach(pipeline)

    session = _Session(client, pipeline, reader, r, w, report, progress)
    session.unplug = unplug
    session.unplug_timeout = options.unplug_timeout
    return await session.run(facts, options.after, uri)


class _Session:
    """One save's moving parts, so that every failure unwinds the same way."""

    def __init__(
        self,
        client: QMPClient,
        pipeline: SavePipeline,
        reader: BlockingReader,
        r: int,
        w: int,
        report: Callable[[str], None] | None,
        progress: Reporter | None = None,
    ) -> None:
        self.client = client
        self.report = report
        self.progress = progress
        # QEMU's states, for progress (listening before migrate: none is missed)
        self.events = client.listen("MIGRATION") if progress is not None else None
        self.pipeline = pipeline
        self.reader = reader
        self.r: int | None = r
        self.w: int | None = w
        self.settings = _Settings(client)
        self.fdname = f"vmtransport-{os.getpid()}-{next(_fdnames)}"
        self.handed = False  # QEMU holds a copy of the write end (getfd)
        self.migrating = False  # migrate was accepted
        self.stopped = False  # we stopped the VM
        self.stats: PumpStats | None = None
        self.pump_error: BaseException | None = None
        self.rolled_back = ""  # where the rollback left the VM, for the error message
        self.unplug: list[FailoverPair] = []  # plugged failover primaries
        self.unplug_timeout = UNPLUG_TIMEOUT
        self.unplugged = False  # the guest unplugged them for this save
        self.unplug_requested = False  # QEMU asked the guest to (UNPLUG_PRIMARY)
        self.generations: dict[str, int | None] = {}  # primary -> plug_generation before
        self.unplug_seconds: float | None = None
        self.sent_running: int | None = None

    def _vm(self, state: str) -> None:
        if self.progress is not None:
            self.progress.state("vm", state)

    def _qemu(self, info: Mapping[str, Any] | None = None) -> None:
        """Hand QEMU's states (its events) and figures (``info``) to the reporter."""
        if self.progress is not None:
            self.progress.qemu(info, self.events)

    def _close_w(self) -> None:
        if self.w is not None:
            os.close(self.w)
            self.w = None

    async def run(self, facts: VMFacts, after: After, uri: str) -> SaveResult:
        try:
            try:
                info = await self._migrate(facts)
                if self.pump_error is not None:
                    raise self.pump_error
            except VMTransportError as exc:
                if self.rolled_back and len(exc.args) == 1:
                    # One line says what failed and where that left the VM.
                    exc.args = (f"{exc.args[0]} ({self.rolled_back})",)
                raise
            assert self.stats is not None
            client = self.client
            runstate = await _wait_settled(client)
            self._vm(runstate)
            await self.settings.restore()
            if after == "resume":
                await client.execute("cont")
                runstate = str((await client.execute("query-status"))["status"])
                self._vm(runstate)
                if self.unplugged:
                    await self._replug()
            elif after == "quit":
                await _quit(client)
                runstate = ""
            result = SaveResult(
                uri, self.stats, facts, self.stopped, after, runstate, info,
                self.unplug_seconds, self.sent_running,
            )  # fmt: skip
            if self.progress is not None:
                extra = {}
                if self.unplug_seconds is not None:
                    extra = {"unplug_seconds": round(self.unplug_seconds, 3),
                             "sent_running": self.sent_running}  # fmt: skip
                self.progress.result(
                    bytes=result.bytes, seconds=result.seconds, uri=uri, path=image_path(uri),
                    vm_state=runstate or None, after=after, **extra,
                )  # fmt: skip
            return result
        finally:
            if self.events is not None:
                self.events.close()
            self._close_w()
            with trio.CancelScope(shield=True):
                await self._close_r()

    async def _migrate(self, facts: VMFacts) -> dict[str, Any]:
        """Stop, hand over the pipe, migrate and pump; roll back unless the image is
        complete. Returns QEMU's final query-migrate."""
        client = self.client
        pump_scope = trio.CancelScope()
        pump_done = trio.Event()
        error: BaseException | None = None
        info: dict[str, Any] = {}

        async def pump() -> None:
            with pump_scope:
                try:
                    self.stats = await self.pipeline.run_async()
                except Exception as exc:
                    self.pump_error = exc
            pump_done.set()

        async with trio.open_nursery() as nursery:
            # The pipeline runs from the start: its reader already waits on the pipe,
            # and a failure anywhere below cancels it, so its sink is aborted.
            nursery.start_soon(pump)
            try:
                await self.settings.apply()
                if self.unplug:  # the guest must run to unplug: RAM waits for the stop
                    hold = max(HOLD_BANDWIDTH_MIN, facts.ram_size // HOLD_SHARE)
                    await self.settings.set({"max-bandwidth": hold})
                elif facts.runstate == "running":
                    await client.execute("stop")
                    self.stopped = True
                    self._vm("paused")
                assert self.w is not None
                await client.getfd(self.w, self.fdname)
                self.handed = True
                self._close_w()  # QEMU's copy is the only writer: its close is our EOF
                for pair in self.unplug:
                    self.generations[str(pair.primary)] = await plug_generation(client, pair)
                # Listening before migrate: no event is missed.
                with client.listen("MIGRATION", "UNPLUG_PRIMARY") as wake:
                    await client.execute("migrate", {"uri": f"fd:{self.fdname}"})
                    self.migrating = True
                    self.handed = False  # migrate took the named descriptor
                    if self.unplug:
                        await self._await_unplug(wake)
                info = await self._follow(pump_done)
                await pump_done.wait()  # QEMU completed: the pump ends with its EOF
            except BaseException as exc:
                # Kept, not raised here: out of a nursery it would come wrapped in an
                # exception group.
                error = exc
            finally:
                pump_scope.cancel()
                if self.stats is None:
                    with trio.CancelScope(shield=True):
                        await self._rollback()
        if error is not None:
            raise error
        return info

    async def _await_unplug(self, wake: EventListener) -> None:
        """While QEMU waits for the guest to unplug the failover primaries (``setup``,
        ``wait-unplug``), keep the VM running; once QEMU goes on, stop the VM and
        have QEMU complete. Raises if the guest does not unplug them within
        :attr:`unplug_timeout`, or cannot any more (the VM stopped, crashed, shut down)."""
        client = self.client
        devices = names(self.unplug)
        started = time.monotonic()
        while True:
            info: dict[str, Any] = await client.execute("query-migrate")
            status = str(info.get("status"))
            self._qemu(info)
            if status in ("failed", "cancelled", "cancelling"):
                why = info.get("error-desc") or status
                raise MigrationError(
                    f"QMP monitor {client.monitor}: QEMU's migration {status} while the "
                    f"guest was to unplug failover primary {devices}: {why}"
                )
            if status == "wait-unplug":
                self.unplug_requested = True
            elif status != "setup":
                break  # the guest unplugged them (or QEMU did not wait): RAM is next
            runstate = str((await client.execute("query-status"))["status"])
            if runstate != "running":
                raise MigrationError(
                    f"QMP monitor {client.monitor}: the guest cannot unplug failover "
                    f"primary {devices} any more: the VM is {runstate}"
                )
            waited = time.monotonic() - started
            if status == "wait-unplug" and self.progress is not None:
                self.progress.state(
                    "failover", "wait-unplug",
                    detail=f"waiting for the guest to unplug {devices}",
                )  # fmt: skip
                self.progress.waiting(devices)
            if waited >= self.unplug_timeout:
                raise MigrationError(
                    f"QMP monitor {client.monitor}: the guest did not unplug failover "
                    f"primary {devices} within {self.unplug_timeout:g} s"
                )
            # A MIGRATION event wakes us at once; the poll catches run-state changes.
            with trio.move_on_after(min(0.25, self.unplug_timeout - waited)):
                self._note(await wake.receive())
            while (event := wake.get_nowait()) is not None:
                self._note(event)
        await client.execute("stop")
        self.stopped = True
        self.unplugged = True
        self.unplug_seconds = time.monotonic() - started
        ram = (await client.execute("query-migrate")).get("ram", {})
        self.sent_running = int(ram.get("transferred", 0))  # all before the stop, at most
        await self.settings.set(AFTER_STOP)  # complete now
        if self.progress is not None:
            self.progress.waiting(None)
            self.progress.state("failover", "unplugged", detail=f"{devices} unplugged")
        self._vm("paused")
        _log.logger().debug(
            "%s unplugged after %.2f s; VM stopped, %d RAM bytes sent before",
            devices, self.unplug_seconds, self.sent_running,
        )  # fmt: skip

    def _note(self, event: Event) -> None:
        if event.name == "UNPLUG_PRIMARY":
            self.unplug_requested = True

    async def _replugged(self) -> tuple[str, bool]:
        """Whether QEMU plugged the primaries back in (it does when a migration it had
        asked the guest to unplug them for fails or is cancelled): the rollback's words,
        and False if one was to be and is seen not plugged back."""
        back: list[str] = []
        out: list[str] = []
        untouched: list[str] = []
        for pair in self.unplug:
            before = self.generations.get(str(pair.primary))
            after = await plug_generation(self.client, pair)
            if before is None or after is None:  # unknown: QEMU's rule is to replug
                (back if self.unplug_requested else untouched).append(str(pair.primary))
            elif after > before:
                back.append(str(pair.primary))
            else:
                (out if self.unplug_requested else untouched).append(str(pair.primary))
        if self.progress is not None and back:
            self.progress.state("failover", "plugged", detail=f"{', '.join(back)} plugged back")
        words = [f"failover primary {', '.join(ids)} {how}"
                 for ids, how in ((back, "plugged back"), (out, "NOT plugged back"),
                                  (untouched, "untouched")) if ids]  # fmt: skip
        return ", ".join(words), not out

    async def _replug(self) -> None:
        """Have QEMU plug the failover primaries the guest unplugged for this save back
        in. QEMU does so by itself only when a migration fails or is cancelled, never
        after one completed; so start one that fails at once: to a unix socket that
        cannot exist (QEMU fails it in connect, before its setup could ask the guest
        for an unplug), in a directory made for it and already gone."""
        client = self.client
        devices = names(self.unplug)
        with tempfile.TemporaryDirectory(prefix="vmtransport-replug-") as gone:
            path = os.path.join(gone, "none")
        await client.execute("migrate", {"uri": f"unix:{path}"})
        status = "setup"
        with trio.move_on_after(COMPLETION_WAIT):
            while status not in _FINAL:
                await trio.sleep(0.01)
                status = str((await client.execute("query-migrate")).get("status"))
        words, back = await self._replugged() if status == "failed" else ("", False)
        if not back:
            why = words or f"the migration that has QEMU do it ended {status}"
            raise MigrationError(
                f"QMP monitor {client.monitor}: the image is complete and the VM resumed, "
                f"but failover primary {devices} could not be plugged back: {why}"
            )

    async def _close_r(self) -> None:
        """Close the read end once no reader thread can read it any more."""
        if self.r is None:
            return
        if await trio.to_thread.run_sync(self.reader.join, 5.0):
            os.close(self.r)
            self.r = None
        else:  # a thread is still in a read: leak the descriptor rather than reuse it
            _log.warning("%s: pipe left open, its reader is stuck", self.pipeline.label)

    async def _follow(self, pump_done: trio.Event) -> dict[str, Any]:
        """Watch QEMU's side until it completes; raise if it fails or the pump does."""
        ended_at: float | None = None  # when the pump saw the stream's end
        while True:
            info: dict[str, Any] = await self.client.execute("query-migrate")
            status = info.get("status")
            self._qemu(info)
            if status in _FINAL and self.progress is not None:
                self.progress.qemu_state(str(status))  # its event may be still unread
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                why = info.get("error-desc") or status
                raise MigrationError(
                    f"QMP monitor {self.client.monitor}: QEMU's migration {status}: {why}"
                )
            if not pump_done.is_set():
                with trio.move_on_after(POLL_INTERVAL):
                    await pump_done.wait()
                continue
            if self.pump_error is not None:
                raise self.pump_error
            # The stream is complete and QEMU closed the pipe: "completed" is due.
            now = time.monotonic()
            ended_at = now if ended_at is None else ended_at
            if now - ended_at > COMPLETION_WAIT:
                raise MigrationError(
                    f"QMP monitor {self.client.monitor}: the stream ended but QEMU's "
                    f"migration is still {status} after {COMPLETION_WAIT:g} s"
                )
            await trio.sleep(0.01)

    async def _rollback(self) -> None:
        """Undo what this save did to the VM, best effort and bounded; never raises.
        Sets :attr:`rolled_back` to the VM's state afterwards."""
        client = self.client
        steps: list[str] = []
        outcome = ""
        with trio.move_on_after(ROLLBACK_TIMEOUT) as scope:
            try:
                if self.migrating:
                    steps.append(f"migration {await self._cancel_migration()}")
                    await _wait_settled(client)
                elif self.handed:
                    try:
                        await client.closefd(self.fdname)
                    except QMPError:
                        pass  # a migrate that failed late had taken it already
                await self.settings.restore()
                steps.append("settings put back")
                if self.stopped:
                    await client.execute("cont")
                    steps.append("VM resumed")
                status = (await client.execute("query-status"))["status"]
                self._vm(str(status))
                outcome = f"the VM is {status}, its migration settings as they were"
                if self.unplug and self.migrating:
                    outcome = f"{outcome}, {(await self._replugged())[0]}"
            except QMPConnectionError as exc:  # QEMU is gone, or its monitor is
                steps.append(f"rollback stopped: {exc}")
                outcome = "the VM's state is unknown"
            except QMPError as exc:
                steps.append(f"rollback stopped: {exc}")
                outcome = f"the VM's state is unknown: {exc}"
        if scope.cancelled_caught:
            steps.append(f"rollback gave up after {ROLLBACK_TIMEOUT:g} s")
            outcome = f"the VM's state is unknown: no rollback within {ROLLBACK_TIMEOUT:g} s"
        self.rolled_back = outcome
        if self.report is not None:
            self.report(outcome)
        _log.logger().debug("save rolled back: %s", "; ".join(steps))

    async def _cancel_migration(self) -> str:
        """migrate_cancel, draining the pipe meanwhile; QEMU's final status."""
        assert self.r is not None
        status = "unknown"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, self.r)
            try:
                try:
                    await self.client.execute("migrate_cancel")
                except QMPError:
                    pass  # it ended meanwhile
                with trio.move_on_after(CANCEL_TIMEOUT):
                    while status not in _FINAL:
                        status = (await self.client.execute("query-migrate")).get("status")
                        self._qemu()
                        await trio.sleep(0.05)
                if status not in _FINAL:
                    # QEMU waits for an unplug it asked the guest for: it ends the
                    # cancel by itself later, plugging the primary back.
                    status = f"still {status} after {CANCEL_TIMEOUT:g} s"
                elif self.progress is not None:
                    self.progress.qemu_state(str(status))
            except QMPConnectionError as exc:
                status = f"unknown ({exc})"
            nursery.cancel_scope.cancel()
        return status


async def _quit(client: QMPClient) -> None:
    try:
        await client.execute("quit")
    except QMPConnectionError:
        pass  # QEMU may close the monitor before its reply gets out
