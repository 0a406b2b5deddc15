"""The ``vmtransport`` console script.

For ``save`` it starts reading QEMU's stream into the pump's buffers *before* importing
the rest of the package: QEMU blocks as soon as the 1 MiB pipe is full, and the imports
take 0.1 s or more here — time the migration would otherwise spend waiting (see
``_early``). Everything else goes straight to the CLI.
"""

from __future__ import annotations

import os
import sys

from ._errors import Interrupted, interrupt_on_signals  # no imports of its own

TYPE_CHECKING = False  # not typing's: importing typing costs milliseconds here
if TYPE_CHECKING:
    from ._early import BlockingReader
    from ._pump import EarlySave, EarlySource
    from .transports import FileTransport, ODirectTransport


def _is_save(argv: list[str]) -> bool:
    words = [a for a in argv if not a.startswith("-")]
    helpish = {"-h", "--help", "--version"} & set(argv)
    return words[:1] == ["save"] and not helpish


def _builtin_file_transport(uri: str) -> type[FileTransport] | type[ODirectTransport] | None:
    from .transports import FileTransport, ODirectTransport  # (not exec:'s, fd:'s modules)

    scheme = uri.partition(":")[0]
    return FileTransport if scheme == "file" else ODirectTransport if scheme == "odirect" else None


def _save_uri(argv: list[str]) -> str | None:
    """The URI of ``[-v] save [--name NAME] URI``; None for any other command line (an
    abbreviated option, ``--``...): argparse has the last word, and this guess must
    never name another URI than it does."""
    rest = [a for a in argv if a not in ("-v", "--verbose")]
    words: list[str] = []
    i = 1
    while i < len(rest):
        if rest[i] == "--name":
            i += 2
            continue
        if rest[i].startswith("-") and not rest[i].startswith("--name="):
            return None
        if not rest[i].startswith("-"):
            words.append(rest[i])
        i += 1
    return words[0] if rest[:1] == ["save"] and len(words) == 1 else None


def _early_save(argv: list[str], reader: BlockingReader) -> EarlySave | None:
    """For ``save file:...``/``odirect:...``: open the target (unnamed until commit) and
    write the reader's buffers into it from now on, while the CLI loads. Only a head
    start: the CLI resolves the URI through the registry as always, carries on with
    this only if that yields the same transport, and reports any error itself."""
    uri = _save_uri(argv)
    cls = _builtin_file_transport(uri) if uri is not None else None
    if uri is None or cls is None:
        return None
    from ._pump import EarlySave, EarlyWriter
    from .image import hash_as_read, save_sink

    try:
        sink = save_sink(cls(cls.parse(uri)), None)
    except Interrupted:
        raise
    except Exception:  # the CLI says what is wrong, in its own order
        return None
    hash_as_read(reader, sink)
    try:
        return EarlySave(cls, uri, EarlyWriter(reader, sink))
    except BaseException:  # a signal: nothing written is kept
        sink.abort()
        raise


def _early_restore(argv: list[str]) -> EarlySource | None:
    """For ``restore file:...``/``odirect:...``: open the file, start reading it into the
    pump's buffers and sending the stream to stdout now, while the CLI loads. Only a
    head start, as for saves: the registry must agree, and the CLI reports errors."""
    words = [a for a in argv if not a.startswith("-")]
    if words[:1] != ["restore"] or len(words) != 2 or os.isatty(1):
        return None
    uri = words[1]
    cls = _builtin_file_transport(uri)
    if cls is None:
        return None
    from ._early import source_reader
    try:
        source = cls(cls.parse(uri)).open_threaded_source()
    except Interrupted:
        raise
    except Exception:
        return None
    reader = source_reader(source, uri)
    # What the writer thread needs, imported now: imports it made itself would share
    # the GIL with the CLI's (pluggy...) and hold up QEMU's first byte by ~0.1 s.
    import json  # noqa: F401  (an image header's metadata)

    import xxhash  # noqa: F401

    from ._io import FdSink
    from ._pump import EarlySource, EarlyWriter
    from .image import VerifyingReader, _libvirt  # noqa: F401  (_libvirt: its header)

    out = FdSink(1, "stdout", close=False)
    return EarlySource(cls, source, out, EarlyWriter(reader, VerifyingReader(out, uri)))


def main() -> int:
    # The reader thread needs the GIL back after every read of the pipe, while this
    # thread imports and parses; the default 5 ms switch interval would let QEMU's pipe
    # fill between two reads.
    sys.setswitchinterval(0.0002)
    # The early writers below write before the CLI is loaded: a signal must already
    # abort them cleanly (exit 1, nothing kept) rather than kill the process outright.
    interrupt_on_signals()
    from . import _log

    _log.cli_stderr = True  # before the early opens: they may warn (O_DIRECT fallback)
    argv = sys.argv[1:]
    helpish = {"-h", "--help", "--version"} & set(argv)
    early_reader: BlockingReader | None = None
    early_save: EarlySave | None = None
    early_restore: EarlySource | None = None
    try:
        if not helpish:
            if _is_save(argv) and not os.isatty(0):
                from ._early import save_reader

                early_reader = save_reader(0)
                early_save = _early_save(argv, early_reader)
                if early_save is not None:
                    # The whole stream goes to the target before the CLI loads: its
                    # imports (~0.1 s of CPU) would compete with the reader for the GIL
                    # and with QEMU for a CPU. The CLI's checks still decide what is kept.
                    early_save.writer.wait()
            else:
                early_restore = _early_restore(argv)
        from ._cli import main as cli_main
    except BaseException as exc:  # a signal, most likely: undo the head start
        for started in (early_save, early_restore):
            if started is not None:
                started.discard()
        if early_reader is not None and early_save is None:
            early_reader.discard()  # (an early save discards its own)
        if isinstance(exc, Interrupted):
            print(f"vmtransport: error: {exc}", file=sys.stderr)
            return exc.exit_code
        raise
    return cli_main(early=early_reader, early_save=early_save, early_restore=early_restore)
