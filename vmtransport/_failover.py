"""virtio-net failover pairs, seen from QMP (for ``save --qmp`` and ``restore --qmp``).

A failover pair is a virtio-net standby (``failover=on``) and a primary PCI device (a
passthrough NIC) naming it in ``failover_pair_id``. QEMU cannot migrate a plugged
primary: at the migration's setup it asks the guest to unplug it (``UNPLUG_PRIMARY``)
and waits in ``wait-unplug``, its stream stalled, until the guest ejects the card. A
stopped, crashed or shut-down guest never does, so a save must keep such a VM running
until the unplug is done, and must bound that wait.

QEMU creates a primary only once the guest's driver negotiated the standby's
``VIRTIO_NET_F_STANDBY`` (until then it is hidden: no QOM object). So a primary found
under ``/machine/peripheral`` is plugged, or was unplugged for a migration that
completed (QEMU keeps it, partially hot-plugged; nothing in QMP tells these apart).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from ._errors import QMPError
from .qmp import QMPClient

#: QOM containers of the devices made with ``-device``/``device_add`` (with an id,
#: without one).
PERIPHERALS: Final = ("/machine/peripheral", "/machine/peripheral-anon")


@dataclass(frozen=True)
class FailoverPair:
    """A standby and its primary, as QMP names them."""

    standby: str  #: the standby's id
    primary: str | None  #: the primary's id (or QOM path without one); None: hidden
    primary_path: str | None = None  #: the primary's QOM path

    @property
    def present(self) -> bool:
        """QEMU created the primary: the guest negotiated STANDBY. A migration will ask
        the guest to unplug it, unless it is already (a completed save's leftover)."""
        return self.primary is not None

    def metadata(self) -> dict[str, Any]:
        return {"standby": self.standby, "primary": self.primary}


async def _get(client: QMPClient, path: str, prop: str) -> Any:
    try:
        return await client.execute("qom-get", {"path": path, "property": prop})
    except QMPError:
        return None  # no such property: not that kind of device


async def _devices(client: QMPClient) -> list[tuple[str, str, str]]:
    """(id or name, QOM path, type) of every ``-device``/``device_add`` device."""
    found = []
    for container in PERIPHERALS:
        try:
            children = await client.execute("qom-list", {"path": container})
        except QMPError:
            continue
        for child in children:
            kind = str(child.get("type", ""))
            if kind.startswith("child<"):
                name = str(child["name"])
                found.append((name, f"{container}/{name}", kind[6:-1]))
    return found


async def find_pairs(client: QMPClient) -> list[FailoverPair]:
    """The VM's failover pairs: every standby with ``failover=on``, and its primary if
    QEMU created it."""
    devices = await _devices(client)
    standbys = [
        name
        for name, path, kind in devices
        if kind.startswith("virtio-net") and await _get(client, path, "failover") is True
    ]
    if not standbys:  # the common case: no device is asked for a pair id
        return []
    primaries: dict[str, tuple[str, str]] = {}  # standby id -> (primary name, path)
    for name, path, _ in devices:
        if name in standbys:
            continue
        pair_id = await _get(client, path, "failover_pair_id")
        if isinstance(pair_id, str) and pair_id:
            primaries[pair_id] = (name, path)
    pairs = []
    for standby in standbys:
        primary = primaries.get(standby)
        pairs.append(
            FailoverPair(standby, primary[0] if primary else None, primary[1] if primary else None)
        )
    return pairs


def names(pairs: list[FailoverPair]) -> str:
    """``hostdev0`` or ``hostdev0, hostdev1``: the primaries a guest must unplug."""
    return ", ".join(p.primary for p in pairs if p.primary is not None)


async def plug_generation(client: QMPClient, pair: FailoverPair) -> int | None:
    """How many times QEMU has plugged the primary back: N of the ``child[N]`` link that
    names it on its bus, which grows by one at every replug (QEMU re-parents the device)
    and stays as it is through an unplug. The only trace of a replug QMP shows (seen on
    QEMU 7.2 and 10.0); None if it cannot be read."""
    path = pair.primary_path
    if path is None:
        return None
    try:
        bus = await client.execute("qom-get", {"path": path, "property": "parent_bus"})
        for prop in await client.execute("qom-list", {"path": bus}):
            name = str(prop.get("name", ""))
            if name.startswith("child[") and str(prop.get("type", "")).startswith("link<"):
                if await client.execute("qom-get", {"path": bus, "property": name}) == path:
                    return int(name[len("child[") : -1])
    except (QMPError, ValueError, TypeError):
        pass
    return None
