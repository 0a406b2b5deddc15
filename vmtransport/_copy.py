"""The use cases: save (stdin -> URI), restore (URI -> stdout), copy (URI -> URI),
inspect and verify. Each wraps the transports' sinks in the image layer (image)."""

from __future__ import annotations

import os
from typing import Final

from ._early import BlockingReader, save_reader, source_reader
from ._errors import StreamError, TransportError, UsageError
from ._io import FdSink, NullSink, is_pollable
from ._pump import EarlySave, EarlySource, PumpStats, pump, pump_blocking, run_trio
from ._registry import get_registry
from ._transport import Sink, Source, Transport
from .image import QEMU_MAGIC, ImageWriter, VerifyingReader, hash_as_read, save_sink


async def open_source(uri: str) -> Source:
    """Open ``uri`` for reading its bytes as they are (restore direction)."""
    return await get_registry().resolve(uri).open_source()


def open_sink(uri: str) -> Sink:
    """Open ``uri`` for writing bytes as they are (save direction). Blocks."""
    return get_registry().resolve(uri).open_sink()


def save_fd(
    uri: str,
    fd: int = 0,
    *,
    name: str | None = None,
    reader: BlockingReader | None = None,
    early: EarlySave | None = None,
) -> PumpStats:
    """Save the QEMU stream arriving on blocking descriptor ``fd`` (stdin) to ``uri``.

    Threads only, no event loop: this is what ``vmtransport save`` runs, passing the
    ``reader`` it started on ``fd`` before its imports — or, for ``file:`` and
    ``odirect:``, the ``early`` save already writing that reader's buffers.
    """
    try:
        transport = get_registry().resolve(uri)
    except BaseException:
        if early is not None:
            early.discard()
        raise
    if early is not None:
        if type(transport) is not early.transport or uri != early.uri:
            early.discard()  # cannot happen: a plugin claiming file: is a registry error
            raise TransportError(f"{uri}: the registry disagrees with the built-in transport")
        reader, sink = early.writer.reader, early.writer.sink
        if isinstance(sink, ImageWriter):
            sink.metadata["name"] = name
    else:
        if reader is None:
            if os.isatty(fd):
                raise UsageError("save reads the migration stream from stdin, which is a terminal")
            reader = save_reader(fd)
        try:
            sink = save_sink(transport, name)
            hash_as_read(reader, sink)
        except BaseException:
            reader.discard()
            raise
    try:
        # Refuse what cannot start a QEMU stream as soon as its first bytes arrive: the
        # pump hands a buffer on only once it is full (8 MiB), and a producer that wrote
        # a few bytes of junk and keeps its end open would stall us.
        first = reader.first_bytes()
        if first and not QEMU_MAGIC.startswith(first):
            raise StreamError(
                f"{transport.uri}: not a QEMU migration stream: starts {first.hex()}, "
                f"expected {QEMU_MAGIC.hex()}"
            )
    except BaseException:
        if early is not None:
            early.discard()  # its reader and sink
        else:
            reader.discard()
            sink.abort()
        raise
    return pump_blocking(reader, sink, early=early.writer if early is not None else None)


async def save(uri: str, fd: int = 0, *, name: str | None = None) -> PumpStats:
    """:func:`save_fd` from a trio task (runs in a worker thread; not cancellable)."""
    import trio

    return await trio.to_thread.run_sync(lambda: save_fd(uri, fd, name=name))


async def copy(src: str, dst: str, *, name: str | None = None) -> PumpStats:
    """Copy the stream at ``src`` (raw, image or libvirt) to ``dst`` (image or raw).

    Both URIs are validated before any I/O."""
    import trio

    reg = get_registry()
    src_t, dst_t = reg.resolve(src), reg.resolve(dst)
    source = await src_t.open_source()
    try:
        sink = await trio.to_thread.run_sync(save_sink, dst_t, name)
    except BaseException:
        await source.abort()
        raise
    return await pump(source, VerifyingReader(sink, src))


def _reader_pump(
    transport: Transport, out: Sink, *, inspect: bool = False, early: EarlySource | None = None
) -> tuple[PumpStats, VerifyingReader]:
    """Run the transport's stream through a VerifyingReader into ``out``: threads for
    file-backed sources, trio otherwise. ``early``: maybe the same source, opened and
    going out to ``out`` already (it is used or discarded)."""
    if early is not None:
        if type(transport) is early.transport:
            stream = early.writer.sink
            assert isinstance(stream, VerifyingReader)
            try:
                return pump_blocking(early.writer.reader, stream, early=early.writer), stream
            finally:
                early.source.close()
        early.discard()  # cannot happen: a plugin claiming file: is a registry error
        raise TransportError(f"{transport.uri}: the registry disagrees with the built-in transport")
    reader = VerifyingReader(out, str(transport.uri), inspect=inspect)
    source = transport.open_threaded_source()
    if source is not None:
        try:
            return pump_blocking(source_reader(source, str(transport.uri)), reader), reader
        finally:
            source.close()

    async def run() -> PumpStats:
        return await pump(await transport.open_source(), reader)

    return run_trio(run), reader


#: written to a pipe or socket when a restore fails before QEMU got a single byte: a
#: QEMU whose incoming stream is empty waits in "inmigrate" for ever, while one that
#: reads this (not the QEVM magic) fails its load at once ("Not a migration stream").
REFUSED: Final = b"VMTRANSPORT-REFUSED\n"


def restore_fd(uri: str, fd: int = 1, *, early: EarlySource | None = None) -> PumpStats:
    """Restore ``uri`` (a raw stream, an image or a libvirt save image) to ``fd``.

    When it fails before any stream byte went out and ``fd`` is a pipe or socket,
    :data:`REFUSED` is written so that a QEMU on the other end fails too."""
    try:
        transport = get_registry().resolve(uri)  # a bad URI is a usage error first
        if os.isatty(fd):
            raise UsageError("restore writes the migration stream to stdout, which is a terminal")
    except BaseException:
        if early is not None:
            early.discard()
        raise
    out = early.out if early is not None else FdSink(fd, "stdout", close=False)
    try:
        return _reader_pump(transport, out, early=early)[0]
    except BaseException:
        if not out.started and is_pollable(fd):
            import select

            try:  # never block on a consumer that stopped reading
                if select.select([], [fd], [], 0)[1]:
                    os.write(fd, REFUSED)
            except OSError:
                pass
        raise


async def restore(uri: str, fd: int = 1) -> PumpStats:
    """Restore ``uri`` to ``fd`` (stdout) from a trio task."""
    transport = get_registry().resolve(uri)
    source = await transport.open_source()
    return await pump(source, VerifyingReader(FdSink(fd, "stdout", close=False), uri))


def read_all(uri: str) -> VerifyingReader:
    """Read the whole image or stream at ``uri`` and describe it (inspect, verify)."""
    return _reader_pump(get_registry().resolve(uri), NullSink(), inspect=True)[1]

