"""Scheme -> transport, through pluggy: built-ins first, then the entry points.

``VMTRANSPORT_DISABLE_PLUGINS`` (comma-separated entry-point names, or ``all``) keeps
third-party plugins from loading, e.g. to rule one out when debugging.

Entry points are found by reading ``*.dist-info/entry_points.txt`` on ``sys.path``
directly rather than through ``importlib.metadata``: importing that costs ~60 ms here,
and a save helper's start-up time is time QEMU spends blocked on a full pipe.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import NamedTuple, cast

import pluggy

from . import _hookspecs
from ._errors import PluginError, URIError
from ._transport import Transport
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
    plugin: str  #: the plugin's registered name
    origin: str  #: "built-in" or "entry point NAME (DIST VERSION)"


class Registry:
    """The known schemes. Build one with :func:`get_registry` (cached) or directly."""

    def __init__(self, *, entry_points: bool = True, extra: tuple[object, ...] = ()) -> None:
        from .transports import _builtin

        pm = pluggy.PluginManager(_hookspecs.PROJECT)
        pm.add_hookspecs(_hookspecs)
        origins: dict[str, str] = {}
        pm.register(_builtin, name="builtin")
        origins["builtin"] = "built-in"
        for i, plugin in enumerate(extra):
            name = getattr(plugin, "__name__", f"extra-{i}")
            pm.register(plugin, name=name)
            origins[name] = "registered in code"
        if entry_points:
            blocked = {
                n.strip() for n in os.environ.get("VMTRANSPORT_DISABLE_PLUGINS", "").split(",")
            }
            for ep in find_entry_points(_hookspecs.PROJECT):
                if ep.name in blocked or "all" in blocked or pm.has_plugin(ep.name):
                    continue
                plugin = ep.load()
                try:
                    pm.register(plugin, name=ep.name)
                except Exception as exc:  # pluggy.PluginValidationError...
                    raise PluginError(
                        f"cannot load plugin {ep.name!r} ({ep.value}): {exc}"
                    ) from exc
                origins[ep.name] = f"entry point {ep.name} ({ep.dist} {ep.version})"
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
