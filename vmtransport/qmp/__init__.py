"""A QMP client on trio: vmtransport's own way to drive QEMU.

::

    from vmtransport import qmp

    async with await qmp.connect("/run/vm/qmp.sock") as monitor:
        with monitor.listen("STOP") as events:
            await monitor.execute("stop")
            print(await events.receive())
        await monitor.getfd(write_end, "migration")

* ``_protocol``: QMP without I/O (framing with a line bound, messages, ids).
* ``_client``: the connection, commands matched to replies by id, event listeners,
  descriptor passing (SCM_RIGHTS).
* ``_sync``: a blocking connection without trio, for the command line's first exchange
  (``restore --qmp`` hands QEMU its stream before trio loads); the client adopts it.

Errors: :class:`~vmtransport.QMPError` (QEMU refused a command: ``error_class``,
``desc``) and :class:`~vmtransport.QMPConnectionError` (the monitor is missing, closed,
stalled or spoke garbage). The client knows nothing of migration policy.

Names load on first use (PEP 562), as the package's: importing ``vmtransport.qmp._sync``
must not import trio.
"""

from __future__ import annotations

from .._errors import QMPConnectionError, QMPError
from ._protocol import DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, MAX_LINE, Event, Greeting

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._client import DEFAULT_EVENT_BUFFER, EventListener, FdsetFd, QMPClient, connect

_EXPORTS: dict[str, tuple[str, str]] = {
    "DEFAULT_EVENT_BUFFER": ("._client", "DEFAULT_EVENT_BUFFER"),
    "EventListener": ("._client", "EventListener"),
    "FdsetFd": ("._client", "FdsetFd"),
    "QMPClient": ("._client", "QMPClient"),
    "connect": ("._client", "connect"),
}

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_EVENT_BUFFER",
    "DEFAULT_TIMEOUT",
    "MAX_LINE",
    "Event",
    "EventListener",
    "FdsetFd",
    "Greeting",
    "QMPClient",
    "QMPConnectionError",
    "QMPError",
    "connect",
]


def __getattr__(name: str) -> Any:
    from .. import _load

    return _load(globals(), _EXPORTS, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
