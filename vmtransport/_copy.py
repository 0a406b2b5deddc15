"""The use cases: save (stdin -> URI), restore (URI -> stdout), copy (URI -> URI)."""

from __future__ import annotations

import os

from ._errors import UsageError
from ._io import FdSink
from ._pump import PumpStats, Tap, fd_reader, pump, pump_blocking
from ._registry import get_registry
from ._transport import Sink, Source


async def open_source(uri: str) -> Source:
    """Open ``uri`` for reading a stream (restore direction)."""
    return await get_registry().resolve(uri).open_source()


def open_sink(uri: str) -> Sink:
    """Open ``uri`` for writing a stream (save direction). Blocks: call from a thread."""
    return get_registry().resolve(uri).open_sink()


def save_fd(uri: str, fd: int = 0, *, taps: tuple[Tap, ...] = ()) -> PumpStats:
    """Save the stream arriving on blocking descriptor ``fd`` (stdin) to ``uri``.

    Threads only, no event loop: this is what ``vmtransport save`` runs.
    """
    transport = get_registry().resolve(uri)
    if os.isatty(fd):
        raise UsageError("save reads the migration stream from stdin, which is a terminal")
    reader = fd_reader(fd, "stdin")
    return pump_blocking(reader, transport.open_sink(), taps=taps)


async def save(uri: str, fd: int = 0, *, taps: tuple[Tap, ...] = ()) -> PumpStats:
    """:func:`save_fd` from a trio task (runs in a worker thread; not cancellable)."""
    import trio

    return await trio.to_thread.run_sync(lambda: save_fd(uri, fd, taps=taps))


async def copy(src: str, dst: str, *, taps: tuple[Tap, ...] = ()) -> PumpStats:
    """Copy the stream at URI ``src`` to URI ``dst``. Both are validated before any I/O."""
    import trio

    reg = get_registry()
    src_t, dst_t = reg.resolve(src), reg.resolve(dst)
    source = await src_t.open_source()
    try:
        sink = await trio.to_thread.run_sync(dst_t.open_sink)
    except BaseException:
        await source.abort()
        raise
    return await pump(source, sink, taps=taps)


def restore_fd(uri: str, fd: int = 1, *, taps: tuple[Tap, ...] = ()) -> PumpStats | None:
    """Restore ``uri`` to ``fd`` with threads only, when its source allows (files).

    Returns None, having done nothing, when the source needs an event loop: then use
    :func:`restore`.
    """
    transport = get_registry().resolve(uri)
    if os.isatty(fd):
        raise UsageError("restore writes the migration stream to stdout, which is a terminal")
    source = transport.open_threaded_source()
    if source is None:
        return None
    try:
        return pump_blocking(source.read_blocking, FdSink(fd, "stdout", close=False), taps=taps)
    finally:
        source.close()


async def restore(uri: str, fd: int = 1, *, taps: tuple[Tap, ...] = ()) -> PumpStats:
    """Restore the stream at ``uri`` to ``fd`` (stdout)."""
    transport = get_registry().resolve(uri)
    if os.isatty(fd):
        raise UsageError("restore writes the migration stream to stdout, which is a terminal")
    source = await transport.open_source()
    return await pump(source, FdSink(fd, "stdout", close=False), taps=taps)
