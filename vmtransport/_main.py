"""The ``vmtransport`` console script.

For ``save`` it starts reading QEMU's stream into the pump's buffers *before* importing
the rest of the package: QEMU blocks as soon as the 1 MiB pipe is full, and the imports
take 0.1 s or more here — time the migration would otherwise spend waiting (see
``_early``). Everything else goes straight to the CLI.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing costs milliseconds here
if TYPE_CHECKING:
    from ._pump import EarlySource


def _is_save(argv: list[str]) -> bool:
    words = [a for a in argv if not a.startswith("-")]
    helpish = {"-h", "--help", "--version"} & set(argv)
    return words[:1] == ["save"] and not helpish


def _early_restore(argv: list[str]) -> EarlySource | None:
    """For ``restore file:...``/``odirect:...``: open the file and start reading it into
    the pump's buffers now, so QEMU gets its first bytes as soon as the CLI is ready.
    Only a head start: the CLI resolves the URI through the registry as always, uses
    this reader only if that yields the same transport, and reports any error itself."""
    words = [a for a in argv if not a.startswith("-")]
    if words[:1] != ["restore"] or len(words) != 2 or os.isatty(1):
        return None
    from ._early import BlockingReader
    from ._pump import EarlySource
    from .transports import FileTransport, ODirectTransport

    uri = words[1]
    scheme = uri.partition(":")[0]
    cls: type[FileTransport] | type[ODirectTransport]
    if scheme == "file":
        cls = FileTransport
    elif scheme == "odirect":
        cls = ODirectTransport
    else:
        return None
    try:
        source = cls(cls.parse(uri)).open_threaded_source()
    except Exception:  # the CLI says what is wrong, in its own order
        return None
    return EarlySource(cls, source, BlockingReader(source.read_blocking, label=uri))


def main() -> int:
    # The reader thread needs the GIL back after every read of the pipe, while this
    # thread imports and parses; the default 5 ms switch interval would let QEMU's pipe
    # fill between two reads.
    sys.setswitchinterval(0.0002)
    from . import _log

    _log.cli_stderr = True  # before the early opens: they may warn (O_DIRECT fallback)
    argv = sys.argv[1:]
    helpish = {"-h", "--help", "--version"} & set(argv)
    early_save = early_restore = None
    if not helpish:
        if _is_save(argv) and not os.isatty(0):
            from ._early import BlockingReader, fd_reader

            early_save = BlockingReader(fd_reader(0), label="stdin", magic=b"QEVM")
        else:
            early_restore = _early_restore(argv)
    from ._cli import main as cli_main

    return cli_main(early=early_save, early_restore=early_restore)
