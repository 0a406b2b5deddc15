"""Scheme -> transport, through pluggy: built-ins first, then the entry points.

``VMTRANSPORT_DISABLE_PLUGINS`` (comma-separated entry-point names, or ``all``) keeps
third-party plugins from loading, e.g. to rule one out when debugging.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import cast

import pluggy

from . import _hookspecs
from ._errors import PluginError, URIError
from ._transport import Transport
from ._uri import split_scheme


@dataclass(frozen=True)
class TransportInfo:
    scheme: str
    transport: type[Transport]
    plugin: str  #: the plugin's registered name
    origin: str  #: "built-in" or "entry point NAME (DIST VERSION)"


class Registry:
    """The known schemes. Build one with :func:`get_registry` (cached) or directly."""

    def __init__(self, *, entry_points: bool = True, extra: tuple[object, ...] = ()) -> None:
        from . import transports

        pm = pluggy.PluginManager(_hookspecs.PROJECT)
        pm.add_hookspecs(_hookspecs)
        origins: dict[str, str] = {}
        pm.register(transports, name="builtin")
        origins["builtin"] = "built-in"
        for i, plugin in enumerate(extra):
            name = getattr(plugin, "__name__", f"extra-{i}")
            pm.register(plugin, name=name)
            origins[name] = "registered in code"
        if entry_points:
            blocked = {
                n.strip() for n in os.environ.get("VMTRANSPORT_DISABLE_PLUGINS", "").split(",")
            }
            for ep in metadata.entry_points(group=_hookspecs.PROJECT):
                if ep.name in blocked or "all" in blocked or pm.has_plugin(ep.name):
                    continue
                try:
                    pm.register(ep.load(), name=ep.name)
                except Exception as exc:  # ImportError, pluggy.PluginValidationError...
                    raise PluginError(
                        f"cannot load plugin {ep.name!r} ({ep.value}): {exc}"
                    ) from exc
                dist = f" ({ep.dist.name} {ep.dist.version})" if ep.dist else ""
                origins[ep.name] = f"entry point {ep.name}{dist}"
        try:
            pm.check_pending()  # a hook name no spec knows (a typo) in any plugin
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            raise PluginError(f"plugin {name!r}: {exc}") from exc
        self._pm = pm
        self._schemes: dict[str, TransportInfo] = {}
        for impl in pm.hook.vmtransport_transports.get_hookimpls():
            name = pm.get_name(impl.plugin) or repr(impl.plugin)
            classes = cast(Sequence[type[Transport]], impl.function())
            for cls in classes:
                scheme = getattr(cls, "scheme", "?")  # _add refuses what is no Transport
                self._add(TransportInfo(scheme, cls, name, origins.get(name, "?")))

    def _add(self, info: TransportInfo) -> None:
        if not (isinstance(info.transport, type) and issubclass(info.transport, Transport)):
            raise PluginError(
                f"plugin {info.plugin!r} returned {info.transport!r}, not a Transport"
            )
        old = self._schemes.get(info.scheme)
        if old is not None:
            raise PluginError(
                f"scheme {info.scheme!r} is claimed by two plugins: {old.plugin!r} "
                f"({old.origin}) and {info.plugin!r} ({info.origin})"
            )
        self._schemes[info.scheme] = info

    def __iter__(self) -> Iterator[TransportInfo]:
        return iter(sorted(self._schemes.values(), key=lambda i: i.scheme))

    def __contains__(self, scheme: object) -> bool:
        return scheme in self._schemes

    def info(self, scheme: str) -> TransportInfo:
        try:
            return self._schemes[scheme]
        except KeyError:
            known = ", ".join(sorted(self._schemes))
            raise URIError(f"unknown scheme {scheme!r} (known: {known})") from None

    def resolve(self, text: str) -> Transport:
        """Parse ``text`` and build its transport (validates options; no I/O)."""
        scheme, _ = split_scheme(text)
        try:
            info = self._schemes[scheme]
        except KeyError:
            known = ", ".join(sorted(self._schemes))
            raise URIError(f"unknown scheme {scheme!r} in URI {text!r} (known: {known})") from None
        return info.transport(info.transport.parse(text))

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        return self._pm


@functools.cache
def get_registry() -> Registry:
    """The process-wide registry: built-ins plus installed entry points."""
    return Registry()


def resolve(text: str) -> Transport:
    return get_registry().resolve(text)
