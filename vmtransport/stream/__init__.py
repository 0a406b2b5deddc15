"""QEMU migration streams: a sans-io parser that validates and describes them."""

from __future__ import annotations

from ._events import EOF as EOF
from ._events import BlockStats as BlockStats
from ._events import Command as Command
from ._events import Configuration as Configuration
from ._events import DeviceSection as DeviceSection
from ._events import Event as Event
from ._events import Header as Header
from ._events import RAMBlock as RAMBlock
from ._events import SectionStart as SectionStart
from ._events import VMDescription as VMDescription
from ._parser import StreamParser as StreamParser

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
