"""Scheme -> transport, through pluggy: built-ins first, then the entry points.

``VMTRANSPORT_DISABLE_PLUGINS`` (comma-separated entry-point names, or ``all``) blocks
those names in the plugin manager (``pm.set_blocked``): their modules are never
imported, e.g. to rule one out when debugging. The built-ins cannot be blocked.

A broken plugin never takes the others down: one that fails to import or register,
whose hook fails or returns something else than Transports, or that claims a scheme
already taken (the built-ins' first) is left out whole, reported once with its name and
the reason (a warning; ``vmtransport plugins`` lists it), and everything else works.

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

from . import _hookspecs, _log
from ._errors import PluginError, URIError
from ._transport import Transport, _resolving
from ._uri import split_scheme
from ._version import __version__


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


class PluginFailure(NamedTuple):
    """A plugin the registry left out, and why (see :attr:`Registry.failures`)."""

    plugin: str  #: its name (the entry point's, or the registered one)
    origin: str  #: as :attr:`TransportInfo.origin`
    reason: str  #: one line: the error

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} ({self.origin}) not loaded: {self.reason}"


class Registry:
    """The known schemes. Build one with :func:`get_registry` (cached) or directly.

    ``extra`` plugins are registered after the built-ins, before the entry points.
    ``plugin_manager``, a fresh ``pluggy.PluginManager("vmtransport")``, lets the caller
    set up tracing, hook-call monitoring or blocked names before the hooks are called.

    A plugin that cannot be imported or registered, whose hook fails or returns
    something other than Transports, or that claims a scheme already taken (a built-in
    one, or another plugin's: the first keeps it) is left out whole, and every other
    transport works; :attr:`failures` says which and why (:func:`get_registry` warns
    once per process). ``strict=True`` raises :class:`~vmtransport.PluginError` for the
    first one instead (for a plugin's own tests).
    """

    def __init__(
        self,
        *,
        entry_points: bool = True,
        extra: tuple[object, ...] = (),
        plugin_manager: pluggy.PluginManager | None = None,
        strict: bool = False,
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
        self._pm = pm
        self._strict = strict
        self.failures: list[PluginFailure] = []  #: plugins left out, in the order found
        self._origins = {"builtin": "built-in"}  # the rest: entry points, else in code
        #: plugin name -> its distribution's version (entry points; the built-ins: ours)
        self.versions: dict[str, str] = {"builtin": __version__}
        for i, plugin in enumerate(extra):
            name = getattr(plugin, "__name__", f"extra-{i}")
            try:
                pm.register(plugin, name=name)
            except Exception as exc:  # pluggy.PluginValidationError: a bad hook signature
                self._fail(name, f"cannot register it: {exc}", exc)
        if entry_points:
            self._load_entry_points()
        self._check_hook_names()
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
                infos = self._infos(name, results)
            except Exception as exc:
                if name == "builtin":
                    raise
                reason = str(exc) if isinstance(exc, PluginError) else f"{hook}() failed: {exc}"
                self._fail(name, reason, exc)
                continue
            clash = next((i for i in infos if i.scheme in self._schemes), None)
            if clash is not None:
                old = self._schemes[clash.scheme]
                self._fail(
                    name,
                    f"it claims the scheme {clash.scheme!r}, which is {old.plugin!r}'s "
                    f"({old.origin})",
                    None,
                )
                continue
            for info in infos:
                self._schemes[info.scheme] = info

    def _fail(self, name: str, reason: str, exc: BaseException | None) -> None:
        """Leave plugin ``name`` out (or, strict, raise)."""
        failure = PluginFailure(name, self._origins.get(name, "registered in code"), reason)
        if self._strict:
            raise PluginError(str(failure)) from exc
        self.failures.append(failure)
        if self._pm.has_plugin(name):
            self._pm.unregister(name=name)

    def _check_hook_names(self) -> None:
        """A hook name no spec knows (a typo) leaves its plugin out."""
        while True:
            try:
                self._pm.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self._pm.get_name(exc.plugin) or repr(exc.plugin)
                if name == "builtin":
                    raise
                self._fail(name, str(exc), exc)

    def _infos(self, name: str, results: list[object]) -> list[TransportInfo]:
        """What plugin ``name``'s hook call returned, checked."""
        infos = []
        for result in results:
            if isinstance(result, str) or not isinstance(result, Sequence):
                raise PluginError(f"it returned {result!r}, not a sequence of Transports")
            for cls in result:
                if not (isinstance(cls, type) and issubclass(cls, Transport)):
                    raise PluginError(f"it returned {cls!r}, not a Transport")
                origin = self._origins.get(name, "registered in code")
                infos.append(TransportInfo(cls.scheme, cls, name, origin))
        schemes = [i.scheme for i in infos]
        twice = next((s for s in schemes if schemes.count(s) > 1), None)
        if twice is not None:
            raise PluginError(f"it returned the scheme {twice!r} twice")
        return infos

    def _load_entry_points(self) -> None:
        pm = self._pm
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
            self._origins[ep.name] = f"entry point {ep.name} ({ep.dist} {ep.version})"
            self.versions[ep.name] = ep.version
            try:
                plugin = ep.load()
            except PluginError as exc:
                self._fail(ep.name, f"cannot import {ep.value}: {exc.__cause__ or exc}", exc)
                continue
            try:
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # pluggy.PluginValidationError...
                self._fail(ep.name, f"cannot register {ep.value}: {exc}", exc)

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
    """The process-wide registry: built-ins plus installed entry points. A plugin left
    out is reported once, here, as a warning naming it and the reason."""
    registry = Registry()
    for failure in registry.failures:
        _log.warning("%s", failure)
    return registry
