"""A broken third-party plugin, as a test fixture: it claims the built-in ``file`` scheme."""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

import vmtransport
from vmtransport.transports import FileTransport


@final
class ClashingFileTransport(vmtransport.Transport):
    scheme = "file"
    summary = "a second file: transport, which the registry must refuse"

    def open_sink(self) -> vmtransport.Sink:
        raise AssertionError("never used")

    async def open_source(self) -> vmtransport.Source:
        raise AssertionError("never used")


assert ClashingFileTransport.scheme == FileTransport.scheme


@vmtransport.hookimpl
def vmtransport_transports() -> Sequence[type[vmtransport.Transport]]:
    return [ClashingFileTransport]
