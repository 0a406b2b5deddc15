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

Errors: :class:`~vmtransport.QMPError` (QEMU refused a command: ``error_class``,
``desc``) and :class:`~vmtransport.QMPConnectionError` (the monitor is missing, closed,
stalled or spoke garbage). The client knows nothing of migration policy.
"""

from __future__ import annotations

from .._errors import QMPConnectionError, QMPError
from ._client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_EVENT_BUFFER,
    DEFAULT_TIMEOUT,
    EventListener,
    FdsetFd,
    QMPClient,
    connect,
)
from ._protocol import MAX_LINE, Event, Greeting

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
