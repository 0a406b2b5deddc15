"""The use cases: save (a QEMU stream -> URI), restore (URI -> a QEMU stream), copy
(URI -> URI), and reading an image whole (inspect, verify).

Each resolves its URIs once, through one registry, and assembles one
:class:`~._pipeline.Pipeline`; the CLI, the Python API and the ``exec:`` helpers all
come through here. ``*_pipeline`` functions return the pipeline unstarted, for callers
that add observers or cancel it; the others run it.
"""

from __future__ import annotations

import os
from typing import Final

from ._buffers import BlockingReader, save_reader
from ._errors import UsageError
from ._io import FdSink, NullSink, is_pollable
from ._pipeline import Pipeline, PumpStats
from ._registry import Registry, get_registry
from ._transport import Sink, Source
from .image import StreamWriter, VerifyingReader, hash_as_read, save_sink


def _registry(registry: Registry | None) -> Registry:
    return registry if registry is not None else get_registry()


async def open_source(uri: str) -> Source:
    """Open ``uri`` for reading its bytes as they are (restore direction)."""
    return await get_registry().resolve(uri).open_source()


def open_sink(uri: str) -> Sink:
    """Open ``uri`` for writing bytes as they are (save direction). Blocks."""
    return get_registry().resolve(uri).open_sink()


class SavePipeline(Pipeline):
    """QEMU's stream (a descriptor, read by a reader thread) -> the stream validator and
    image writer -> the transport's sink. :attr:`image` is the validating stage (its
    ``parser`` describes the stream)."""

    image: StreamWriter


class RestorePipeline(Pipeline):
    """A transport's source -> the verifying reader (recognises raw streams, images and
    libvirt images; withholds the stream's end until the image is proven) -> a sink
    (stdout, or a save's stage for ``copy``). :attr:`reader` describes what was read."""

    reader: VerifyingReader
    out: Sink  #: where the bare stream goes
    out_fd: int | None = None  #: the descriptor behind ``out``, when it is one


def _check_open(fd: int, name: str, why: str) -> None:
    try:
        os.fstat(fd)
    except OSError:
        raise UsageError(f"{name}: not open ({why})") from None


def save_pipeline(
    uri: str,
    source: int | BlockingReader = 0,
    *,
    name: str | None = None,
    registry: Registry | None = None,
) -> SavePipeline:
    """Assemble the save of the QEMU stream on ``source`` (a blocking descriptor, e.g.
    stdin, or a reader already started on one) into ``uri``. Opens the target (blocks:
    call from a thread in async code)."""
    transport = _registry(registry).resolve(uri)
    if isinstance(source, BlockingReader):
        reader = source
    else:
        _check_open(source, "stdin", "save reads the migration stream from it")
        if os.isatty(source):
            raise UsageError("save reads the migration stream from stdin, which is a terminal")
        reader = save_reader(source)
    try:
        image = save_sink(transport, name)
        hash_as_read(reader, image)
    except BaseException:
        reader.discard()
        raise
    pipeline = SavePipeline(reader, image, label=str(transport.uri))
    pipeline.image = image
    return pipeline


def save_fd(uri: str, fd: int = 0, *, name: str | None = None) -> PumpStats:
    """Save the QEMU stream arriving on blocking descriptor ``fd`` (stdin) to ``uri``;
    threads only, no event loop."""
    return save_pipeline(uri, fd, name=name).run()


async def save(uri: str, fd: int = 0, *, name: str | None = None) -> PumpStats:
    """:func:`save_fd` from a trio task; cancelling the task cancels the save."""
    import trio

    pipeline = await trio.to_thread.run_sync(lambda: save_pipeline(uri, fd, name=name))
    return await pipeline.run_async()


#: written to a pipe or socket when a restore fails before QEMU got a single byte: a
#: QEMU whose incoming stream is empty waits in "inmigrate" for ever, while one that
#: reads this (not the QEVM magic) fails its load at once ("Not a migration stream").
REFUSED: Final = b"VMTRANSPORT-REFUSED\n"


def restore_pipeline(
    uri: str,
    out: int | Sink = 1,
    *,
    registry: Registry | None = None,
    inspect: bool = False,
) -> RestorePipeline:
    """Assemble the restore of ``uri`` (a raw stream, an image or a libvirt save image)
    into ``out``: a descriptor (stdout) or a sink. With ``inspect``, problems are
    recorded in the reader instead of raised. No I/O until it runs."""
    transport = _registry(registry).resolve(uri)  # a bad URI is a usage error first
    out_fd = out if isinstance(out, int) else None
    if isinstance(out, int):
        _check_open(out, "stdout", "restore writes the migration stream to it")
        if os.isatty(out):
            raise UsageError("restore writes the migration stream to stdout, which is a terminal")
        # confirm: a QEMU that stopped reading (it refused the stream) fails the restore
        # even when the whole stream fit in the pipe.
        out = FdSink(out, "stdout", close=False, confirm=True)
    reader = VerifyingReader(out, str(transport.uri), inspect=inspect)
    pipeline = RestorePipeline(transport, reader, label=str(transport.uri))
    pipeline.reader, pipeline.out, pipeline.out_fd = reader, out, out_fd
    return pipeline


def refuse(pipeline: RestorePipeline) -> None:
    """A restore failed: if nothing reached its pipe or socket yet, tell QEMU (REFUSED)."""
    out, fd = pipeline.out, pipeline.out_fd
    if fd is None or not isinstance(out, FdSink) or out.started:
        return
    import select

    try:  # never block on a consumer that stopped reading
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if is_pollable(fd) and poller.poll(0):
            os.write(fd, REFUSED)
    except OSError:
        pass


def restore_fd(uri: str, fd: int = 1) -> PumpStats:
    """Restore ``uri`` to descriptor ``fd`` (stdout). When it fails before any stream
    byte went out and ``fd`` is a pipe or socket, :data:`REFUSED` is written so that a
    QEMU on the other end fails too."""
    pipeline = restore_pipeline(uri, fd)
    try:
        return pipeline.run()
    except BaseException:
        refuse(pipeline)
        raise


async def restore(uri: str, fd: int = 1) -> PumpStats:
    """:func:`restore_fd` from a trio task; cancelling the task cancels the restore."""
    pipeline = restore_pipeline(uri, fd)
    try:
        return await pipeline.run_async()
    except BaseException:
        refuse(pipeline)
        raise


def copy_pipeline(
    src: str, dst: str, *, name: str | None = None, registry: Registry | None = None
) -> RestorePipeline:
    """Assemble a copy of the stream at ``src`` (raw, image or libvirt) to ``dst`` (an
    image where it can be). Both URIs are validated before any I/O; opens ``dst``."""
    reg = _registry(registry)
    src_t, dst_t = reg.resolve(src), reg.resolve(dst)
    image = save_sink(dst_t, name)
    reader = VerifyingReader(image, str(src_t.uri))
    pipeline = RestorePipeline(src_t, reader, label=str(src_t.uri))
    pipeline.reader, pipeline.out = reader, image
    return pipeline


async def copy(src: str, dst: str, *, name: str | None = None) -> PumpStats:
    """Copy the stream at ``src`` (raw, image or libvirt) to ``dst`` (image or raw) from
    a trio task; cancelling the task cancels the copy."""
    import trio

    pipeline = await trio.to_thread.run_sync(lambda: copy_pipeline(src, dst, name=name))
    return await pipeline.run_async()


def read_all(uri: str) -> VerifyingReader:
    """Read the whole image or stream at ``uri`` and describe it (inspect, verify)."""
    pipeline = restore_pipeline(uri, NullSink(), inspect=True)
    pipeline.run()
    return pipeline.reader
