"""The events a :class:`~vmtransport.stream.StreamParser` returns as the stream's
elements complete, and its per-block page counts."""

from __future__ import annotations

from typing import Any, NamedTuple, final

from ._wire import COMMANDS


@final
class Header(NamedTuple):
    """The stream's magic and version were read (the version is always 3)."""

    version: int


@final
class Configuration(NamedTuple):
    """The configuration section: machine type and, when present, its subsections."""

    machine_type: str
    #: Migration capabilities QEMU asks the destination to match (``x-ignore-shared``...).
    capabilities: tuple[str, ...] = ()
    target_page_bits: int | None = None
    uuid: str | None = None


@final
class SectionStart(NamedTuple):
    """A START or FULL section header."""

    section_type: str  # 'start' | 'full'
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@final
class RAMBlock(NamedTuple):
    """One entry of the RAM setup block list."""

    name: str
    used_length: int


@final
class Command(NamedTuple):
    """A QEMU_VM_COMMAND (no footer follows it)."""

    cmd: int
    data: bytes

    @property
    def name(self) -> str:
        return COMMANDS.get(self.cmd, ("UNKNOWN", -1))[0]


@final
class DeviceSection(NamedTuple):
    """A non-RAM START or FULL section whose payload size is known."""

    idstr: str
    instance_id: int
    version_id: int
    section_id: int
    #: Payload bytes, without the section header and footer.
    size: int
    #: Stream offset of the section's type byte.
    offset: int = -1


@final
class EOF(NamedTuple):
    """QEMU's EOF marker, the 0x00 section type, is at stream offset ``offset``."""

    offset: int


@final
class VMDescription(NamedTuple):
    """The JSON description QEMU appends after EOF."""

    json: dict[str, Any]


Event = (
    Header | Configuration | SectionStart | RAMBlock | Command | DeviceSection | EOF | VMDescription
)


@final
class BlockStats(NamedTuple):
    """Per RAM block counters of the page records seen in the stream."""

    used_length: int
    normal_pages: int
    zero_pages: int
    xbzrle_pages: int = 0
