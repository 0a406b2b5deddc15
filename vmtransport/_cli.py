"""Command line: argument parsing, exit codes and one-line errors; nothing else."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Sequence

from . import _log
from ._errors import UsageError, VMTransportError, interrupt_on_signals
from ._version import __version__

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    from ._buffers import BlockingReader
    from ._pipeline import Pipeline
    from ._progress import Reporter

    T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _progress_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help=f"a progress line on stderr (default: {default})",
    )
    p.add_argument(
        "--events",
        choices=("json",),
        help="one JSON object a line on stderr, for programs (docs/events.md); "
        "replaces --progress and the error line",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: not a number of seconds > 0")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vmtransport",
        description="Migration transports for QEMU: save, restore and copy VM state streams.",
    )
    p.add_argument("--version", action="version", version=f"vmtransport {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="statistics; tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("save", help="write the stream on stdin (or of the VM behind --qmp) to URI")
    s.add_argument("uri", metavar="URI")
    s.add_argument("--name", help="a name for the VM, kept in the image's metadata")
    s.add_argument(
        "--qmp",
        metavar="SOCKET",
        help="save the VM behind this QMP socket: stop it, migrate it into URI",
    )
    s.add_argument(
        "--after",
        choices=("pause", "resume", "quit"),
        help="with --qmp: what becomes of the VM once its image is complete (default: pause)",
    )
    s.add_argument(
        "--pause-vm",
        action="store_true",
        help="with --qmp: stop the VM only once a failover primary is unplugged, and "
        "have the image restore paused",
    )
    s.add_argument(
        "--unplug-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="with --qmp: how long the guest may take to unplug a failover primary "
        "before the save is cancelled (default: 30)",
    )
    _progress_args(s, "on with --qmp when stderr is a terminal, else off")
    r = sub.add_parser(
        "restore", help="write the stream at URI to stdout (or into the QEMU behind --qmp)"
    )
    r.add_argument("uri", metavar="URI")
    r.add_argument(
        "--qmp",
        metavar="SOCKET",
        help="restore into the QEMU behind this QMP socket (started with -incoming defer)",
    )
    run = r.add_mutually_exclusive_group()
    run.add_argument(
        "--running",
        dest="state",
        action="store_const",
        const="running",
        help="with --qmp: run the VM afterwards, whatever the image recorded",
    )
    run.add_argument(
        "--paused",
        dest="state",
        action="store_const",
        const="paused",
        help="with --qmp: leave the VM paused afterwards, whatever the image recorded",
    )
    r.add_argument(
        "--failover-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="with --qmp: how long to wait for QEMU to plug a failover primary the image "
        "names (default: 10)",
    )
    _progress_args(r, "on with --qmp when stderr is a terminal, else off")
    c = sub.add_parser("copy", help="copy the stream at SRC to DST")
    c.add_argument("src", metavar="SRC")
    c.add_argument("dst", metavar="DST")
    c.add_argument("--name", help="a name for the VM, kept in the image's metadata")
    _progress_args(c, "on when stderr is a terminal")
    i = sub.add_parser("inspect", help="show what an image or stream holds")
    i.add_argument("image", metavar="IMAGE|URI")
    i.add_argument("--json", action="store_true", help="the documented JSON document")
    v = sub.add_parser("verify", help="exit 0 only for a complete image whose checksum matches")
    v.add_argument("image", metavar="IMAGE|URI")
    pl = sub.add_parser("plugins", help="list the URI schemes and the plugins providing them")
    pl.add_argument("--json", action="store_true", help="the documented JSON document")
    return p


def _plugins(as_json: bool) -> None:
    from ._registry import get_registry

    registry = get_registry()
    if as_json:
        import json

        plugins: dict[str, dict[str, object]] = {}
        for i in registry:
            entry = plugins.setdefault(i.plugin, {
                "name": i.plugin, "version": registry.versions.get(i.plugin),
                "origin": i.origin, "loaded": True, "schemes": [],
            })  # fmt: skip
            schemes = entry["schemes"]
            assert isinstance(schemes, list)
            schemes.append({"scheme": i.scheme, "summary": i.transport.summary})
        failed: list[dict[str, object]] = [
            {"name": f.plugin, "version": registry.versions.get(f.plugin), "origin": f.origin,
             "loaded": False, "schemes": [], "reason": f.reason}
            for f in registry.failures
        ]  # fmt: skip
        doc = {"schema": "vmtransport-plugins/1", "plugins": [*plugins.values(), *failed]}
        _print(json.dumps(doc, indent=2))
        return
    rows = [(i.scheme + ":", i.plugin, i.origin, i.transport.summary) for i in registry]
    w = [max(len(r[k]) for r in rows) for k in range(3)]
    lines = []
    for r in rows:
        lines.append(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip())
    lines.extend(f"not loaded: {f.plugin} ({f.origin}): {f.reason}" for f in registry.failures)
    _print("\n".join(lines))


def _as_uri(arg: str) -> str:
    """A bare path (or anything naming an existing file) means file:PATH."""
    if ":" not in arg or os.path.exists(arg):
        return "file:" + arg.replace(",", ",,")
    return arg


def _print(text: str) -> None:
    """Print a report; a reader that went away (``inspect ... | head``) is not an error
    worth a traceback: the rest is dropped, as the shell's own tools do."""
    if sys.stdout is None:  # Python's answer to a closed fd 1: print would drop the report
        raise UsageError("stdout: not open (the report is written to it)")
    try:
        print(text, flush=True)
    except OSError as exc:
        # Python flushes stdout again at exit: point it somewhere that accepts it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        if isinstance(exc, BrokenPipeError):
            raise SystemExit(141) from None  # 128 + SIGPIPE, what a killed writer reports
        from ._errors import io_error

        raise io_error("writing stdout", exc) from None


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        inner: list[BaseException] = [
            e for e in exc.exceptions if isinstance(e, VMTransportError)
        ]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def _stdin_reader(args: argparse.Namespace) -> BlockingReader | None:
    """The head start of ``save``: start reading QEMU's stream from stdin now, before
    the rest of the package loads (QEMU blocks as soon as the pipe is full). Imports C
    modules only (see ``_buffers``)."""
    if args.command != "save" or args.qmp is not None:
        return None
    try:
        os.fstat(0)
    except OSError:
        return None  # closed: save_pipeline says why that will not do
    if os.isatty(0):
        return None  # (a terminal: save_pipeline says why that will not do)
    from ._buffers import save_reader

    return save_reader(0)


def _reporter(args: argparse.Namespace) -> Reporter | None:
    """What --progress/--events ask for. Without either, the helpers QEMU runs through
    ``exec:`` (plain save and restore) print nothing: QEMU's stderr may well be a
    terminal, and a bar there would garble it."""
    if args.command not in ("save", "restore", "copy"):
        return None
    qemu_runs_it = args.command in ("save", "restore") and getattr(args, "qmp", None) is None
    quiet = args.progress is False or (args.progress is None and qemu_runs_it)
    if args.events is None and quiet:
        return None  # not even the import (it counts before a restore's hand-over)
    from ._progress import make_reporter

    return make_reporter(args.progress, args.events, default=not qemu_runs_it)


def _fail(reporter: Reporter | None, message: str, code: int, vm: str | None = None) -> int:
    """The one error line (or, with --events json, the error event instead); the bar
    is erased first so the line stands alone."""
    if reporter is not None:
        from ._progress import JsonRenderer

        reporter.error(message, vm=vm, exit=code)
        if isinstance(reporter.renderer, JsonRenderer):
            return code
    print(f"vmtransport: error: {message}", file=sys.stderr)
    return code


def _qmp_job(
    job: Callable[[Callable[[str], None]], Awaitable[T]], reporter: Reporter | None
) -> T | int:
    """Run ``job(report)`` under trio (signals cancel it: rolled back). A signal ends it
    with its own line and where the rollback left the VM (the job's last report), and
    128 + the signal, as a shell reports a process the signal killed: that exit code is
    returned instead of the job's result."""
    from ._errors import Interrupted
    from ._pipeline import run_trio

    outcome: list[str] = []
    try:
        return run_trio(lambda: job(outcome.append))
    except Interrupted as exc:
        if not outcome or exc.signum is None:
            raise
        message = f"{exc} ({outcome[-1]})"
        return _fail(reporter, message, 128 + exc.signum, vm=outcome[-1])


def _save_vm(args: argparse.Namespace, verbose: bool, reporter: Reporter | None) -> int:
    """``save --qmp``: the API's save_vm."""
    from ._orchestration import UNPLUG_TIMEOUT, save_vm

    result = _qmp_job(
        lambda report: save_vm(
            args.qmp,
            args.uri,
            after=args.after or "pause",
            pause_vm=args.pause_vm,
            unplug_timeout=args.unplug_timeout or UNPLUG_TIMEOUT,
            name=args.name,
            report=report,
            progress=reporter,
        ),
        reporter,
    )
    if isinstance(result, int):
        return result
    if verbose:
        _log.logger().info(
            "saved %s to %s: %d bytes in %.2f s (%.0f MiB/s); VM %s",
            args.qmp, args.uri, result.bytes, result.seconds, result.mib_per_s,
            result.runstate or "quit",
        )  # fmt: skip
    return 0


def _restore_vm(args: argparse.Namespace, verbose: bool, reporter: Reporter | None) -> int:
    """``restore --qmp``: the API's restore_vm, its start done before trio loads, so
    that QEMU has its stream sooner (see ``_handoff``)."""
    from ._errors import Interrupted
    from ._handoff import UNTOUCHED, Refused, follow, prepare

    if reporter is not None:  # (as restore_vm's)
        reporter.start("restore", uri=args.uri, monitor=args.qmp)
    try:
        early = prepare(args.qmp, args.uri, progress=reporter)
    except Refused as refused:  # as restore_vm and _qmp_job say an image refused at once
        exc = refused.error
        if isinstance(exc, Interrupted) and exc.signum is not None:
            return _fail(reporter, f"{exc} ({UNTOUCHED})", 128 + exc.signum, vm=UNTOUCHED)
        if reporter is not None and isinstance(exc, VMTransportError):
            reporter.error(str(exc), vm=UNTOUCHED, exit=exc.exit_code)
        raise exc from None
    follow(early, reporter)  # until QEMU's load ends: trio's import waits till then
    from ._restore_vm import FAILOVER_TIMEOUT, resume_restore

    try:
        result = _qmp_job(
            lambda report: resume_restore(
                early, state=args.state, report=report, progress=reporter,
                failover_timeout=args.failover_timeout or FAILOVER_TIMEOUT,
            ),
            reporter,
        )
    finally:
        interrupt_on_signals()  # prepare() deferred them
    if isinstance(result, int):
        return result
    if verbose:
        _log.logger().info(
            "restored %s into %s: %d bytes in %.2f s (%.0f MiB/s); recorded %s, VM %s",
            args.uri, args.qmp, result.bytes, result.seconds, result.mib_per_s,
            result.recorded or "nothing", result.runstate,
        )  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(argv if argv is not None else sys.argv[1:])
    verbose = "-v" in argv or "--verbose" in argv
    _log.cli_stderr = True
    reader: BlockingReader | None = None
    reporter: Reporter | None = None
    try:
        args = _parser().parse_args(argv)
        reporter = _reporter(args)
        if args.command in ("save", "restore", "copy"):
            # Signals raise Interrupted in this thread, which cancels the pipeline (or,
            # under trio, run_trio turns them into cancellation).
            interrupt_on_signals()
            # The reader thread must get the GIL back within a fraction of a pipe's
            # worth of stream while the writer thread parses: 0.2 ms, not 5 ms.
            sys.setswitchinterval(0.0002)
            reader = _stdin_reader(args)
        if args.command == "plugins":
            _plugins(args.json)
            return 0
        if args.command == "inspect":
            from ._inspect import describe, render

            doc = describe(_as_uri(args.image))
            import json

            _print(json.dumps(doc, indent=2) if args.json else render(doc))
            return 0
        if args.command == "verify":
            from ._inspect import verify

            doc = verify(_as_uri(args.image))
            _print(f"{args.image}: OK: complete vmtransport image, xxh3-128 checksum matches "
                   f"({doc['stream']['length']} stream bytes)")  # fmt: skip
            return 0
        from . import _usecases

        pipeline: Pipeline
        restore: _usecases.RestorePipeline | None = None
        if args.command == "save" and args.qmp is not None:
            return _save_vm(args, verbose, reporter)
        if args.command == "save":
            for flag, value in (("--after", args.after), ("--unplug-timeout", args.unplug_timeout),
                                ("--pause-vm", args.pause_vm or None)):  # fmt: skip
                if value is not None:
                    raise UsageError(f"{flag} applies to a save with --qmp only")
        if args.command == "restore" and args.qmp is not None:
            return _restore_vm(args, verbose, reporter)
        if args.command == "restore" and args.state is not None:
            raise UsageError(f"--{args.state} applies to a restore with --qmp only")
        if args.command == "restore" and args.failover_timeout is not None:
            raise UsageError("--failover-timeout applies to a restore with --qmp only")
        if args.command == "save":
            pipeline = _usecases.save_pipeline(args.uri, reader or 0, name=args.name)
            reader = None  # the pipeline's now
            what = f"saved to {args.uri}"
        elif args.command == "restore":
            pipeline = restore = _usecases.restore_pipeline(args.uri, 1)
            what = f"restored from {args.uri}"
        else:
            pipeline = _usecases.copy_pipeline(args.src, args.dst, name=args.name)
            what = f"copied {args.src} to {args.dst}"
        if reporter is not None:
            from ._progress import image_path

            # uri: what is written (save, copy) or read (restore); path: its file
            uri = args.dst if args.command == "copy" else args.uri
            path = image_path(uri) if args.command != "restore" else None
            extra = {"source": args.src} if args.command == "copy" else {}
            reporter.start(args.command, uri=uri, **extra)
            reporter.attach(pipeline)
        try:
            stats = pipeline.run()
        except BaseException:
            if restore is not None:
                _usecases.refuse(restore)
            raise
        if reporter is not None:
            reporter.result(bytes=stats.bytes, seconds=stats.seconds, uri=uri, path=path)
    except BaseException as raw:
        if reader is not None:
            reader.discard()
        exc = _unwrap(raw)
        if isinstance(exc, SystemExit):
            raise exc from None
        if isinstance(exc, VMTransportError):
            if verbose:
                _log.logger().error("traceback", exc_info=exc)
            return _fail(reporter, str(exc), exc.exit_code)
        if isinstance(exc, KeyboardInterrupt):
            return _fail(reporter, "interrupted", 130)
        if reporter is not None:
            reporter.close()
        raise
    if verbose:
        _log.logger().info(
            "%s: %d bytes in %.2f s (%.0f MiB/s)",
            what,
            stats.bytes,
            stats.seconds,
            stats.mib_per_s,
        )
    return 0
