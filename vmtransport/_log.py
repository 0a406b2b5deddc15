"""The package's logger ("vmtransport"), with logging imported on first use.

Importing logging takes a while (docs/performance.md), and a save helper's start-up is
time QEMU spends blocked, so nothing imports it until there is something to log.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's import would count in a helper's start-up
if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

#: set by the CLI: log records go to stderr as "vmtransport: LEVEL: message"
cli_stderr = False
#: set while a progress reporter owns stderr (a bar being redrawn, JSON lines): it
#: takes the lines other parts would write there (log records, an exec: target's
#: stderr), so that they neither garble the bar nor break the JSON
stderr_hook: Callable[[str], None] | None = None
_logger: logging.Logger | None = None


def stderr_line(text: str) -> None:
    """Write a line (with its newline) to stderr, through :data:`stderr_hook` if set."""
    import sys

    hook = stderr_hook
    if hook is not None:
        hook(text)
        return
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # no stderr, or a closed one
        pass


def logger() -> logging.Logger:
    global _logger
    if _logger is None:
        import logging

        log = logging.getLogger("vmtransport")
        if cli_stderr:

            class Handler(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    try:
                        stderr_line(self.format(record) + "\n")
                    except Exception:
                        self.handleError(record)

            handler: logging.Handler = Handler()
            handler.setFormatter(logging.Formatter("vmtransport: %(levelname)s: %(message)s"))
            log.setLevel(logging.INFO)
            log.propagate = False
        else:
            handler = logging.NullHandler()  # a library leaves output to the application
        log.addHandler(handler)
        _logger = log
    return _logger


def warning(msg: str, *args: object) -> None:
    logger().warning(msg, *args)
