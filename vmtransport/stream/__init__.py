"""QEMU migration streams: a sans-io parser that validates and describes them."""

from __future__ import annotations

from ._parser import EOF as EOF
from ._parser import BlockStats as BlockStats
from ._parser import Command as Command
from ._parser import Configuration as Configuration
from ._parser import DeviceSection as DeviceSection
from ._parser import Event as Event
from ._parser import Header as Header
from ._parser import RAMBlock as RAMBlock
from ._parser import SectionStart as SectionStart
from ._parser import StreamParser as StreamParser
from ._parser import VMDescription as VMDescription

__all__ = [
    "EOF",
    "BlockStats",
    "Command",
    "Configuration",
    "DeviceSection",
    "Event",
    "Header",
    "RAMBlock",
    "SectionStart",
    "StreamParser",
    "VMDescription",
]
