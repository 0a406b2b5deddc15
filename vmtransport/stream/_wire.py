"""QEMU's migration stream, byte by byte (QEMU 7.2 through 10.x), and the parser's
states, shared by its parts.

Layout (big-endian throughout; QEMU's ``migration/savevm.c`` and ``migration/ram.c``)::

    header        be32 "QEVM", be32 3
    configuration 0x07, be32 len, machine type, subsections (0x05 ...) -- no footer
    sections      0x01 START / 0x04 FULL: be32 id, u8 len, idstr, be32 instance, be32 version
                  0x02 PART / 0x03 END:   be32 id
                  payload, then a footer 0x7e + be32 id (every machine type since 2.4)
    commands      0x08, be16 cmd, be16 len, data -- no footer
    EOF           0x00
    description   0x06, be32 len, JSON (unless the machine suppresses it)

RAM (idstr ``ram``) is a run of be64 ``offset | flags`` words and is self-delimiting.
"""

from __future__ import annotations

import struct
from typing import Final

QEMU_VM_FILE_VERSION: Final = 3
MAGIC: Final = b"QEVM"

# Section types
SEC_EOF: Final = 0x00
SEC_START: Final = 0x01
SEC_PART: Final = 0x02
SEC_END: Final = 0x03
SEC_FULL: Final = 0x04
SEC_SUBSECTION: Final = 0x05
SEC_VMDESCRIPTION: Final = 0x06
SEC_CONFIGURATION: Final = 0x07
SEC_COMMAND: Final = 0x08
SEC_FOOTER: Final = 0x7E

# RAM flags, in the low bits of each be64 word
RAM_ZERO: Final = 0x02
RAM_MEM_SIZE: Final = 0x04
RAM_PAGE: Final = 0x08
RAM_EOS: Final = 0x10
RAM_CONTINUE: Final = 0x20
RAM_XBZRLE: Final = 0x40
RAM_HOOK: Final = 0x80
RAM_COMPRESS_PAGE: Final = 0x100
RAM_MULTIFD_FLUSH: Final = 0x200
RAM_VERSION: Final = 4
XBZRLE_ENCODING: Final = 0x01

# MIG_CMD_* (enum qemu_vm_cmd in savevm.c); value: (name, fixed length or -1)
COMMANDS: Final[dict[int, tuple[str, int]]] = {
    1: ("OPEN_RETURN_PATH", 0),
    2: ("PING", 4),
    3: ("POSTCOPY_ADVISE", -1),
    4: ("POSTCOPY_LISTEN", 0),
    5: ("POSTCOPY_RUN", 0),
    6: ("POSTCOPY_RAM_DISCARD", -1),
    7: ("PACKAGED", 4),
    8: ("ENABLE_COLO", 0),
    9: ("POSTCOPY_RESUME", 0),
    10: ("RECV_BITMAP", -1),
    11: ("SWITCHOVER_START", 0),
}
#: ENABLE_COLO, POSTCOPY_RESUME, RECV_BITMAP: only on a live two-way migration
RETURN_PATH_ONLY: Final = frozenset({8, 9, 10})
CMD_POSTCOPY_ADVISE: Final = 3
CMD_PACKAGED: Final = 7

#: Device state past this size is not a plausible QEMU stream (VGA memory is RAM, not this).
MAX_TAIL: Final = 64 << 20
# Largest element parsed in one piece: a command (be16 length) with its header.
MAX_ELEMENT: Final = 0x10000 + 16
JOIN: Final = MAX_ELEMENT + 512
MAX_MACHINE_NAME: Final = 1024

BE16 = struct.Struct(">H")
BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")
CMD_HDR = struct.Struct(">BHH")

# Parser states
S_HEADER: Final = 0
S_TOP: Final = 1  # expecting a section type byte
S_RAM: Final = 2  # inside a RAM section: be64 words
S_FOOTER: Final = 3  # expecting a section footer
S_OPAQUE: Final = 4  # non-RAM section met while RAM still streams: scan for its footer
S_TAIL: Final = 5  # device state, EOF and description: buffered until close()
S_CLOSED: Final = 6
S_FAILED: Final = 7


def printable(b: bytes | bytearray | memoryview) -> bool:
    return all(0x20 <= c < 0x7F for c in b)
