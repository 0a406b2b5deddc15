"""The one error hierarchy of vmtransport.

    VMTransportError                 anything this package raises on purpose
     +-- UsageError                  the caller's fault; the CLI exits 2
     |    +-- URIError               a URI that does not parse or names no transport
     +-- PluginError                 a plugin that cannot be registered (duplicate scheme...)
     +-- TransportError              I/O failed while opening, moving or committing; exit 1
     |    +-- CommandError           an exec: command exited non-zero
     +-- StreamError                 the bytes are not (a complete) QEMU stream or image
     +-- QMPError                    QEMU answered a QMP command with an error
     +-- QMPConnectionError          the QMP monitor is not there, closed, stalled or spoke
     |                               something that is not QMP
     +-- MigrationError              QEMU's migration failed or was cancelled
     +-- Interrupted                 a signal stopped the work

Every message names the input it is about and the reason, on one line.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's (see _buffers)


class VMTransportError(Exception):
    """Base class of every error vmtransport raises deliberately."""

    exit_code: int = 1


class UsageError(VMTransportError):
    """Bad arguments: the caller can fix it by changing the command line."""

    exit_code = 2


class URIError(UsageError):
    """A URI that does not parse, names an unknown scheme or carries bad options."""


class PluginError(VMTransportError):
    """A plugin could not be registered."""


class TransportError(VMTransportError):
    """A transport failed to open, move or commit a stream."""


class CommandError(TransportError):
    """An exec: command failed; the message carries the tail of its stderr."""


class StreamError(VMTransportError):
    """Data that is not a QEMU migration stream, or one that ended early."""


class QMPError(VMTransportError):
    """QEMU refused a QMP command: carries QEMU's error ``class`` and ``desc``."""

    def __init__(self, monitor: str, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP monitor {monitor}: {command} failed: {error_class}: {desc}")
        self.monitor = monitor
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPConnectionError(VMTransportError):
    """The QMP monitor cannot be used: no such socket, nothing listening, no greeting, the
    connection closed, a command without a reply in time, or bytes that are not QMP."""


class MigrationError(VMTransportError):
    """QEMU reported its migration failed or cancelled (its ``error-desc`` says why)."""


class Interrupted(VMTransportError):
    """A signal (SIGTERM, SIGINT, SIGHUP) stopped the work; half-written output is gone."""

    signum: int | None = None  #: the signal, when one did it


def io_error(what: str, exc: OSError) -> TransportError:
    """The TransportError for a failed system call: ``what`` names the input and the
    action (``"reading file:/x"``), the reason is the OS's."""
    reason = exc.strerror or str(exc)
    return TransportError(f"{what}: {reason}")


def _raise_interrupted(signum: int, frame: object) -> None:
    import signal

    exc = Interrupted(f"interrupted by {signal.Signals(signum).name}")
    exc.signum = signum
    raise exc


def interrupt_on_signals() -> None:
    """Make SIGTERM, SIGINT and SIGHUP raise :class:`Interrupted` in the main thread, so
    that the code they land in aborts its sinks (no half-written output is kept)."""
    # _signal, not signal: the save helper calls this before its reader starts, and
    # signal's import pulls in enum, while QEMU waits on a full pipe (docs/performance.md).
    if TYPE_CHECKING:
        import signal as _signal
    else:
        import _signal

    for sig in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP):
        _signal.signal(sig, _raise_interrupted)
