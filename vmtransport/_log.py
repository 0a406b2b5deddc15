"""The package's logger ("vmtransport"), with logging imported on first use.

Importing logging takes a while (docs/performance.md), and a save helper's start-up is
time QEMU spends blocked, so nothing imports it until there is something to log.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's import would count in a helper's start-up
if TYPE_CHECKING:
    import logging

#: set by the CLI: log records go to stderr as "vmtransport: LEVEL: message"
cli_stderr = False
_logger: logging.Logger | None = None


def logger() -> logging.Logger:
    global _logger
    if _logger is None:
        import logging

        log = logging.getLogger("vmtransport")
        if cli_stderr:
            handler: logging.Handler = logging.StreamHandler()
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
