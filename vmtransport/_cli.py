"""Command line: argument parsing, exit codes and one-line errors; nothing else."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from . import __version__
from ._copy import copy, restore, restore_fd, save_fd
from ._errors import UsageError, VMTransportError
from ._pump import PumpStats
from ._registry import get_registry

log = logging.getLogger("vmtransport")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vmtransport",
        description="Migration transports for QEMU: save, restore and copy VM state streams.",
    )
    p.add_argument("--version", action="version", version=f"vmtransport {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="statistics; tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("save", help="write the stream on stdin to URI")
    s.add_argument("uri", metavar="URI")
    r = sub.add_parser("restore", help="write the stream at URI to stdout")
    r.add_argument("uri", metavar="URI")
    c = sub.add_parser("copy", help="copy the stream at SRC to DST")
    c.add_argument("src", metavar="SRC")
    c.add_argument("dst", metavar="DST")
    sub.add_parser("plugins", help="list the URI schemes and the plugins providing them")
    return p


def _plugins() -> None:
    rows = [(i.scheme + ":", i.plugin, i.origin, i.transport.summary) for i in get_registry()]
    w = [max(len(r[k]) for r in rows) for k in range(3)]
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip())


class Interrupted(VMTransportError):
    """A signal asked us to stop; whatever was half-written is removed."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")


def _run_async(job: Callable[[], Awaitable[PumpStats]]) -> PumpStats:
    import trio

    return trio.run(_run, job)


async def _run(job: Callable[[], Awaitable[PumpStats]]) -> PumpStats:
    import trio

    # SIGTERM/SIGINT become cancellation, so a killed helper still cleans up.
    async with trio.open_nursery() as nursery:
        result: list[PumpStats] = []

        async def main() -> None:
            result.append(await job())
            nursery.cancel_scope.cancel()

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as it:
                async for signum in it:
                    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")

        nursery.start_soon(signals)
        nursery.start_soon(main)
    return result[0]


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        inner: list[BaseException] = [
            e for e in exc.exceptions if isinstance(e, VMTransportError)
        ]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    verbose = "-v" in (argv if argv is not None else sys.argv[1:]) or "--verbose" in (
        argv if argv is not None else sys.argv[1:]
    )
    logging.basicConfig(format="vmtransport: %(levelname)s: %(message)s", level=logging.INFO)
    try:
        args = _parser().parse_args(argv)
        if args.command == "plugins":
            _plugins()
            return 0
        if args.command in ("save", "restore"):
            # Without an event loop (see _pump) signals raise in this thread.
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, _raise_interrupted)
        if args.command == "save":
            stats = save_fd(args.uri, 0)
            what = f"saved to {args.uri}"
        elif args.command == "restore":
            maybe = restore_fd(args.uri, 1)
            if maybe is None:  # the source needs the event loop
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                maybe = _run_async(lambda: restore(args.uri))
            stats = maybe
            what = f"restored from {args.uri}"
        else:
            stats = _run_async(lambda: copy(args.src, args.dst))
            what = f"copied {args.src} to {args.dst}"
    except BaseException as raw:
        exc = _unwrap(raw)
        if isinstance(exc, SystemExit):
            raise exc from None
        if isinstance(exc, VMTransportError):
            if verbose:
                log.exception("traceback", exc_info=exc)
            print(f"vmtransport: error: {exc}", file=sys.stderr)
            return exc.exit_code
        if isinstance(exc, KeyboardInterrupt):
            print("vmtransport: error: interrupted", file=sys.stderr)
            return 130
        raise
    if verbose:
        log.info(
            "%s: %d bytes in %.2f s (%.0f MiB/s)", what, stats.bytes, stats.seconds,
            stats.mib_per_s,
        )
    return 0
