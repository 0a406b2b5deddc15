"""The plugin contract (pluggy project name and entry-point group: ``vmtransport``).

A plugin is a module or object with ``@hookimpl``-decorated functions, announced in its
package metadata::

    [project.entry-points.vmtransport]
    zstd = "vmtransport_zstd"

Hooks are synchronous: they return classes; the I/O happens in the objects those
classes create.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ._transport import Transport

PROJECT = "vmtransport"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def vmtransport_transports() -> Sequence[type[Transport]]:  # type: ignore[empty-body]
    """Return the :class:`~vmtransport.Transport` subclasses this plugin provides.

    Each class's ``scheme`` must be unique across all plugins: a scheme claimed twice is
    an error naming both plugins.
    """
