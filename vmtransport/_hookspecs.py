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
def vmtransport_transports(  # type: ignore[empty-body]
    plugin_name: str,
) -> Sequence[type[Transport]]:
    """Return the :class:`~vmtransport.Transport` subclasses this plugin provides.

    Each class's ``scheme`` must be unique across all plugins: a scheme claimed twice is
    an error naming both plugins.

    The registry calls this hook once per plugin implementing it, through pluggy's hook
    caller restricted to that plugin's implementation and every hook wrapper
    (``pm.subset_hook_caller``), so that each scheme is attributed to the plugin that
    provided it. ``plugin_name`` is that plugin's registered name; an implementation
    may leave it out of its signature, as pluggy passes only the arguments named.

    A hook wrapper (``@hookimpl(wrapper=True)``) is run around each of these calls: it
    receives the list of results (that plugin's one sequence), and what it returns,
    filtered, replaced or added to, is what the registry takes from ``plugin_name``.
    """
