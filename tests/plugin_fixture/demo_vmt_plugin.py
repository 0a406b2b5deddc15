"""A third-party vmtransport plugin, as a test fixture: the ``xor:PATH`` scheme.

It stores the stream in a file with every byte XORed with 0x5A, so a test can tell that
this plugin (not ``file:``) handled the stream. The tests install it as the distribution
``demo-plugin 1.0`` with the entry point ``demo = demo_vmt_plugin`` in the ``vmtransport``
group.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import final

import vmtransport

_KEY = bytes(b ^ 0x5A for b in range(256))


@final
class XorSink(vmtransport.Sink):
    def __init__(self, path: str) -> None:
        self._path = path
        self._tmp = f"{path}.xor-tmp"
        self._f = open(self._tmp, "wb")  # closed in commit/abort

    def write(self, data: memoryview) -> None:
        self._f.write(bytes(data).translate(_KEY))

    def commit(self) -> None:
        self._f.close()
        os.replace(self._tmp, self._path)

    def abort(self) -> None:
        self._f.close()
        try:
            os.unlink(self._tmp)
        except OSError:
            pass


@final
class XorSource(vmtransport.Source):
    def __init__(self, path: str) -> None:
        self._f = open(path, "rb")  # closed in commit/abort

    async def readinto(self, buf: memoryview) -> int:
        import trio

        data = await trio.to_thread.run_sync(self._f.read, len(buf))
        buf[: len(data)] = data.translate(_KEY)
        return len(data)

    async def commit(self) -> None:
        self._f.close()

    async def abort(self) -> None:
        self._f.close()


@final
class XorTransport(vmtransport.Transport):
    scheme = "xor"
    summary = "demo plugin: a file with every byte XORed with 0x5A"

    def open_sink(self) -> vmtransport.Sink:
        return XorSink(self.uri.target)

    async def open_source(self) -> vmtransport.Source:
        return XorSource(self.uri.target)


@vmtransport.hookimpl
def vmtransport_transports() -> Sequence[type[vmtransport.Transport]]:
    return [XorTransport]
