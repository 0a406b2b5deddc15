"""The vmtransport image format, and the sinks that write and read it.

* ``_header``: the image header's layout and codec (docs/image-format.md).
* ``_writer``: save — :class:`StreamWriter` validates the QEMU stream as it passes,
  :class:`ImageWriter` also writes the header and checksum on a seekable target.
* ``_reader``: restore — :class:`VerifyingReader` recognises a raw stream, an image or
  a libvirt save image (``_detect``, ``_libvirt``), decompresses where libvirt
  compressed (``_decompress``), and withholds the stream's end until it is verified.
"""

from __future__ import annotations

from ._detect import FORMAT_IMAGE, FORMAT_LIBVIRT, FORMAT_RAW
from ._header import QEMU_MAGIC, ImageHeader
from ._reader import VerifyingReader
from ._writer import ImageWriter, StreamWriter, hash_as_read, save_sink

__all__ = [
    "FORMAT_IMAGE",
    "FORMAT_LIBVIRT",
    "FORMAT_RAW",
    "QEMU_MAGIC",
    "ImageHeader",
    "ImageWriter",
    "StreamWriter",
    "VerifyingReader",
    "hash_as_read",
    "save_sink",
]
