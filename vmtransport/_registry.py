"""Scheme -> transport, through pluggy: built-ins first, then the entry points.

``VMTRANSPORT_DISABLE_PLUGINS`` (comma-separated entry-point names, or ``all``) blocks
those names in the plugin manager (``pm.set_blocked``): their modules are never
imported, e.g. to rule one out when debugging. The built-ins cannot be blocked.

Entry points are found by reading ``*.dist-info/entry_points.txt`` on ``sys.path``
directly rather than through ``importlib.metadata``, whose import costs more than
building the whole registry: a save helper's start-up time is time QEMU spends blocked
on a full pipe.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from _thread import get_ident
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import pluggy

from . import _hookspecs
from ._errors import PluginError, URIError
from ._transport import Transport, _resolving
from ._uri import split_scheme


class EntryPoint(NamedTuple):
    name: str
    value: str  #: "module" or "module:attr.attr"
    dist: str
    version: str

    def load(self) -> object:
        module, _, attrs = self.value.partition(":")
        try:
            obj: object = importlib.import_module(module.strip())
            for attr in filter(None, attrs.strip().split(".")):
                obj = getattr(obj, attr)
        except Exception as exc:
            raise PluginError(
                f"cannot load plugin {self.name!r} ({self.value}) of {self.dist}: {exc}"
            ) from exc
        return obj


def _name_version(path: str, dist: str, version: str) -> tuple[str, str]:
    """The distribution's own spelling of its name (the folder name is normalized)."""
    for meta in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(path, meta), errors="replace") as f:
                for line in f:
                    if not line.strip():
                        break  # end of the headers
                    key, _, value = line.partition(":")
                    if key == "Name":
                        dist = value.strip()
                    elif key == "Version":
                        version = value.strip()
            break
        except OSError:
            continue
    return dist, version


def find_entry_points(group: str) -> list[EntryPoint]:
    """The entry points of ``group`` of the distributions on ``sys.path``.

    As importlib.metadata does: the first distribution of a name on the path wins.
    """
    found: list[EntryPoint] = []
    seen: set[str] = set()
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for d in names:
            if not d.endswith((".dist-info", ".egg-info")):
                continue
            dist, _, version = d.rsplit(".", 1)[0].partition("-")
            key = dist.lower().replace("-", "_").replace(".", "_")
            if key in seen:
                continue
            seen.add(key)
            try:
                with open(os.path.join(entry or ".", d, "entry_points.txt")) as f:
                    text = f.read()
            except OSError:
                continue
            if f"[{group}]" not in text:
                continue
            dist, version = _name_version(os.path.join(entry or ".", d), dist, version)
            section = ""
            for line in text.splitlines():
                line = line.strip()
                if line.startswith("[") and line.endswith("]"):
                    section = line[1:-1].strip()
                elif section == group and "=" in line and not line.startswith(("#", ";")):
                    name, _, value = line.partition("=")
                    found.append(EntryPoint(name.strip(), value.strip(), dist, version))
    return found


class TransportInfo(NamedTuple):
    scheme: str
    transport: type[Transport]
    plugin: str  #: the registered name of the plugin whose hook call returned it
    origin: str  #: "built-in", "registered in code" or "entry point NAME (DIST VERSION)"


class Registry:
    """The known schemes. Build one with :func:`get_registry` (cached) or directly.

    ``extra`` plugins are registered after the built-ins, before the entry points.
    ``plugin_manager``, a fresh ``pluggy.PluginManager("vmtransport")``, lets the caller
    set up tracing, hook-call monitoring or blocked names before the hooks are called.
    """

    def __init__(
        self,
        *,
        entry_points: bool = True,
        extra: tuple[object, ...] = (),
        plugin_manager: pluggy.PluginManager | None = None,
    ) -> None:
        from .transports import _builtin

        pm = pluggy.PluginManager(_hookspecs.PROJECT) if plugin_manager is None else plugin_manager
        if pm.project_name != _hookspecs.PROJECT:
            raise ValueError(
                f"plugin manager of project {pm.project_name!r}, not {_hookspecs.PROJECT!r}"
            )
        pm.add_hookspecs(_hookspecs)
        if pm.register(_builtin, name="builtin") is None:
            raise PluginError("the built-in transports cannot be blocked")
        origins = {"builtin": "built-in"}  # the rest: entry points, else registered in code
        for i, plugin in enumerate(extra):
            pm.register(plugin, name=getattr(plugin, "__name__", f"extra-{i}"))
        if entry_points:
            self._load_entry_points(pm, origins)
        try:
            pm.check_pending()  # a hook name no spec knows (a typo) in any plugin
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            raise PluginError(f"plugin {name!r}: {exc}") from exc
        self._pm = pm
        self._schemes: dict[str, TransportInfo] = {}
        # One call per providing plugin, through pluggy's hook caller with the other
        # providers left out (wrappers stay in), so each scheme is attributed to its plugin.
        hook = "vmtransport_transports"
        providers = [
            i.plugin
            for i in getattr(pm.hook, hook).get_hookimpls()
            if not (i.wrapper or i.hookwrapper)
        ]
        for plugin in providers:
            name = pm.get_name(plugin) or repr(plugin)
            call = pm.subset_hook_caller(hook, [p for p in providers if p is not plugin])
            try:
                results: list[object] = call(plugin_name=name)
            except Exception as exc:
                raise PluginError(f"plugin {name!r}: {hook}() failed: {exc}") from exc
            for result in results:
                if isinstance(result, str) or not isinstance(result, Sequence):
                    raise PluginError(
                        f"plugin {name!r} returned {result!r}, not a sequence of Transports"
                    )
                for cls in result:
                    scheme = getattr(cls, "scheme", "?")  # _add refuses what is no Transport
                    origin = origins.get(name, "registered in code")
                    self._add(TransportInfo(scheme, cls, name, origin))

    @staticmethod
    def _load_entry_points(pm: pluggy.PluginManager, origins: dict[str, str]) -> None:
        found = find_entry_points(_hookspecs.PROJECT)
        disabled = {n.strip() for n in os.environ.get("VMTRANSPORT_DISABLE_PLUGINS", "").split(",")}
        if "all" in disabled:
            disabled.update(ep.name for ep in found)
        for name in disabled - {""}:
            if not pm.has_plugin(name):  # the built-ins and plugins registered in code stay
                pm.set_blocked(name)
        for ep in found:
            if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
                continue
            plugin = ep.load()
            try:
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # pluggy.PluginValidationError...
                raise PluginError(f"cannot load plugin {ep.name!r} ({ep.value}): {exc}") from exc
            origins[ep.name] = f"entry point {ep.name} ({ep.dist} {ep.version})"

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
        return self._lookup(scheme, "")

    def _lookup(self, scheme: str, where: str) -> TransportInfo:
        try:
            return self._schemes[scheme]
        except KeyError:
            known = ", ".join(sorted(self._schemes))
            raise URIError(f"unknown scheme {scheme!r}{where} (known: {known})") from None

    def resolve(self, text: str) -> Transport:
        """Parse ``text`` and build its transport (validates options; no I/O).

        The transport's :attr:`~vmtransport.Transport.registry` is this registry, so a
        transport wrapping another resolves its inner URI here, not in a global one.
        """
        cls = self._lookup(split_scheme(text)[0], f" in URI {text!r}").transport
        thread = get_ident()
        outer = _resolving.get(thread)  # a wrapping transport resolving its inner URI
        _resolving[thread] = self
        try:
            return cls(cls.parse(text))
        finally:
            if outer is None:
                del _resolving[thread]
            else:
                _resolving[thread] = outer

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        return self._pm


@functools.cache
def get_registry() -> Registry:
    """The process-wide registry: built-ins plus installed entry points."""
    return Registry()
