"""The ``vmtransport`` console script.

For ``save`` it starts reading QEMU's stream into the pump's buffers *before* importing
the rest of the package: QEMU blocks as soon as the 1 MiB pipe is full, and the imports
take ~0.1 s here — time the migration would otherwise spend waiting (see _pump).
Everything else goes straight to the CLI.
"""

from __future__ import annotations

import os
import sys


def _is_save(argv: list[str]) -> bool:
    words = [a for a in argv if not a.startswith("-")]
    helpish = {"-h", "--help", "--version"} & set(argv)
    return words[:1] == ["save"] and not helpish


def main() -> int:
    early = None
    if _is_save(sys.argv[1:]) and not os.isatty(0):
        from ._pump import BlockingReader, fd_reader

        early = BlockingReader(fd_reader(0), label="stdin", magic=b"QEVM")
    from ._cli import main as cli_main

    return cli_main(early=early)
