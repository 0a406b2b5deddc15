"""The ``vmtransport`` console script: QEMU runs it at the other end of its stream.

It loads as little as it can before the CLI parses the command line: ``save`` starts
reading QEMU's stream right after parsing (see ``_cli._stdin_reader``), and every
millisecond before that is time QEMU's migration thread sits blocked on a full pipe.
"""

from __future__ import annotations

import sys

from ._errors import interrupt_on_signals  # no imports of its own


def main() -> int:
    # A signal before the CLI is up must still end the helper with one error line and
    # nothing kept, not a traceback from the middle of an import.
    interrupt_on_signals()
    try:
        from ._cli import main as cli_main
    except BaseException as exc:
        from ._errors import Interrupted

        if isinstance(exc, Interrupted):
            print(f"vmtransport: error: {exc}", file=sys.stderr)
            return exc.exit_code
        raise
    return cli_main(sys.argv[1:])
