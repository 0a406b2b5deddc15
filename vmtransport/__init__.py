"""vmtransport: pluggable migration transports for QEMU.

The public API, most important first. Everything else lives in private modules, which
load on first use (PEP 562): the ``vmtransport`` command starts reading a save's stream
before it imports them (see ``_main``). ``vmtransport.qmp`` is the QMP client.
"""

from __future__ import annotations

from ._version import __version__

TYPE_CHECKING = False  # not typing's: a helper's start-up counts (see ``_buffers``)
if TYPE_CHECKING:
    from typing import Any

    from ._errors import (
        CommandError,
        Interrupted,
        MigrationError,
        PluginError,
        QMPConnectionError,
        QMPError,
        StreamError,
        TransportError,
        URIError,
        UsageError,
        VMTransportError,
    )
    from ._failover import FailoverPair
    from ._hookspecs import hookimpl
    from ._inspect import describe as inspect_image
    from ._inspect import verify as verify_image
    from ._orchestration import SaveResult, VMFacts, save_vm
    from ._pipeline import (
        STATES,
        Pipeline,
        Progress,
        PumpStats,
        StateEvent,
        pump,
        pump_blocking,
    )
    from ._progress import BarRenderer, JsonRenderer, Reporter
    from ._registry import Registry, TransportInfo, get_registry
    from ._restore_vm import RestoreResult, restore_vm
    from ._transport import (
        SeekableSink,
        Sink,
        Source,
        ThreadedSource,
        Transport,
        WrappingTransport,
    )
    from ._uri import URI, parse_uri
    from ._usecases import (
        RestorePipeline,
        SavePipeline,
        copy,
        copy_pipeline,
        open_sink,
        open_source,
        restore,
        restore_fd,
        restore_pipeline,
        save,
        save_fd,
        save_pipeline,
    )

_EXPORTS: dict[str, tuple[str, str]] = {
    "copy": ("._usecases", "copy"),
    "open_sink": ("._usecases", "open_sink"),
    "open_source": ("._usecases", "open_source"),
    "restore": ("._usecases", "restore"),
    "restore_fd": ("._usecases", "restore_fd"),
    "save": ("._usecases", "save"),
    "save_fd": ("._usecases", "save_fd"),
    "copy_pipeline": ("._usecases", "copy_pipeline"),
    "restore_pipeline": ("._usecases", "restore_pipeline"),
    "save_pipeline": ("._usecases", "save_pipeline"),
    "RestorePipeline": ("._usecases", "RestorePipeline"),
    "SavePipeline": ("._usecases", "SavePipeline"),
    "CommandError": ("._errors", "CommandError"),
    "Interrupted": ("._errors", "Interrupted"),
    "MigrationError": ("._errors", "MigrationError"),
    "SaveResult": ("._orchestration", "SaveResult"),
    "FailoverPair": ("._failover", "FailoverPair"),
    "VMFacts": ("._orchestration", "VMFacts"),
    "save_vm": ("._orchestration", "save_vm"),
    "RestoreResult": ("._restore_vm", "RestoreResult"),
    "restore_vm": ("._restore_vm", "restore_vm"),
    "PluginError": ("._errors", "PluginError"),
    "QMPConnectionError": ("._errors", "QMPConnectionError"),
    "QMPError": ("._errors", "QMPError"),
    "StreamError": ("._errors", "StreamError"),
    "TransportError": ("._errors", "TransportError"),
    "URIError": ("._errors", "URIError"),
    "UsageError": ("._errors", "UsageError"),
    "VMTransportError": ("._errors", "VMTransportError"),
    "hookimpl": ("._hookspecs", "hookimpl"),
    "inspect_image": ("._inspect", "describe"),
    "verify_image": ("._inspect", "verify"),
    "PumpStats": ("._pipeline", "PumpStats"),
    "pump": ("._pipeline", "pump"),
    "pump_blocking": ("._pipeline", "pump_blocking"),
    "Pipeline": ("._pipeline", "Pipeline"),
    "Progress": ("._pipeline", "Progress"),
    "StateEvent": ("._pipeline", "StateEvent"),
    "BarRenderer": ("._progress", "BarRenderer"),
    "JsonRenderer": ("._progress", "JsonRenderer"),
    "Reporter": ("._progress", "Reporter"),
    "STATES": ("._pipeline", "STATES"),
    "Registry": ("._registry", "Registry"),
    "TransportInfo": ("._registry", "TransportInfo"),
    "get_registry": ("._registry", "get_registry"),
    "SeekableSink": ("._transport", "SeekableSink"),
    "Sink": ("._transport", "Sink"),
    "Source": ("._transport", "Source"),
    "ThreadedSource": ("._transport", "ThreadedSource"),
    "Transport": ("._transport", "Transport"),
    "WrappingTransport": ("._transport", "WrappingTransport"),
    "URI": ("._uri", "URI"),
    "parse_uri": ("._uri", "parse_uri"),
}

__all__ = [
    "STATES",
    "URI",
    "BarRenderer",
    "CommandError",
    "FailoverPair",
    "Interrupted",
    "JsonRenderer",
    "MigrationError",
    "Pipeline",
    "PluginError",
    "Progress",
    "PumpStats",
    "QMPConnectionError",
    "QMPError",
    "Registry",
    "Reporter",
    "RestorePipeline",
    "RestoreResult",
    "SavePipeline",
    "SaveResult",
    "SeekableSink",
    "Sink",
    "Source",
    "StateEvent",
    "StreamError",
    "ThreadedSource",
    "Transport",
    "TransportError",
    "TransportInfo",
    "URIError",
    "UsageError",
    "VMFacts",
    "VMTransportError",
    "WrappingTransport",
    "__version__",
    "copy",
    "copy_pipeline",
    "get_registry",
    "hookimpl",
    "inspect_image",
    "open_sink",
    "open_source",
    "parse_uri",
    "pump",
    "pump_blocking",
    "restore",
    "restore_fd",
    "restore_pipeline",
    "restore_vm",
    "save",
    "save_fd",
    "save_pipeline",
    "save_vm",
    "verify_image",
]


def _load(namespace: dict[str, Any], exports: dict[str, tuple[str, str]], name: str) -> Any:
    """PEP 562 for this package and its subpackages: import the module ``exports`` names
    for ``name`` on first use, and keep the value in the package's ``namespace``."""
    package = namespace["__name__"]
    try:
        module, attr = exports[name]
    except KeyError:
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module, package), attr)
    namespace[name] = value
    return value


def __getattr__(name: str) -> Any:
    return _load(globals(), _EXPORTS, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
