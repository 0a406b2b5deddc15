"""The registry: built-ins through the plugin hook, called through pluggy's hook caller
(wrappers, tracing, blocking), a transport wrapping another through its own registry, and
a real third-party plugin found through the ``vmtransport`` entry-point group of an
installed distribution.

The plugin modules live in tests/plugin_fixture/. Each test "installs" one by writing a
``*.dist-info`` directory beside a copy of the module and putting that directory on
PYTHONPATH (subprocesses) or sys.path (in-process): exactly what pip leaves behind.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import final

import pluggy
import pytest

import vmtransport
from vmtransport import PluginError, Registry, Sink, Source, Transport, URIError
from vmtransport.testing import SyntheticStream
from vmtransport.transports import ExecTransport, FdTransport, FileTransport, ODirectTransport
from vmtransport.transports import _builtin as builtin_transports

VMT = Path(sys.executable).parent / "vmtransport"
FIXTURES = Path(__file__).parent / "plugin_fixture"
BUILTIN_SCHEMES = ["exec", "fd", "file", "odirect"]
#: the schemes of the repository's own plugins, which scripts/setup.sh installs beside it
INSTALLED = ["zstd"] if importlib.util.find_spec("vmtransport_zstd") else []
TIMEOUT = 30


def install_plugin(
    site: Path, module: str, *, entry_name: str = "demo", dist: str = "demo_plugin"
) -> Path:
    """Install ``plugin_fixture/<module>.py`` as distribution ``dist`` 1.0 into ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / f"{module}.py", site / f"{module}.py")
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(f"[vmtransport]\n{entry_name} = {module}\n")
    return site


def env_with(site: Path | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VMTRANSPORT_DISABLE_PLUGINS"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    env.update(extra)
    return env


def vmt(
    *args: str, env: dict[str, str], input: bytes = b"", stdout: int = subprocess.PIPE
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(VMT), *args],
        input=input,
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )


def load_fixture(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def demo_site(tmp_path: Path) -> Path:
    return install_plugin(tmp_path / "site", "demo_vmt_plugin")


@pytest.fixture
def clash_site(tmp_path: Path) -> Path:
    return install_plugin(tmp_path / "site", "clash_vmt_plugin", dist="clash_plugin")


@pytest.fixture
def on_sys_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Put sites on sys.path for in-process entry-point discovery; undo the imports."""
    sites: list[Path] = []
    before = set(sys.modules)
    yield sites
    for site in sites:
        assert str(site) in sys.path
    for name in set(sys.modules) - before:
        if name.endswith("_vmt_plugin"):
            del sys.modules[name]
    importlib.invalidate_caches()


# --- built-ins ---------------------------------------------------------------------------


def test_builtins_come_through_the_hook() -> None:
    reg = Registry(entry_points=False)
    assert [i.scheme for i in reg] == BUILTIN_SCHEMES
    for info in reg:
        assert info.plugin == "builtin"
        assert info.origin == "built-in"
        assert issubclass(info.transport, Transport)
        assert info.transport.scheme == info.scheme
        assert info.transport.summary
    pm = reg.plugin_manager
    assert pm.get_plugin("builtin") is builtin_transports
    impls = pm.hook.vmtransport_transports.get_hookimpls()
    assert [pm.get_name(i.plugin) for i in impls] == ["builtin"]
    assert list(builtin_transports.vmtransport_transports()) == [
        FileTransport,
        ODirectTransport,
        FdTransport,
        ExecTransport,
    ]


def test_contains_and_info() -> None:
    reg = Registry(entry_points=False)
    assert "file" in reg
    assert "xor" not in reg
    assert 42 not in reg
    assert reg.info("odirect").transport is ODirectTransport


def test_process_registry_is_cached_and_has_the_builtins() -> None:
    reg = vmtransport.get_registry()
    assert reg is vmtransport.get_registry()
    for scheme in BUILTIN_SCHEMES:
        assert reg.info(scheme).origin == "built-in"


# --- plugins registered in code -------------------------------------------------------------


def test_extra_module_in_process() -> None:
    demo = load_fixture("demo_vmt_plugin")
    reg = Registry(entry_points=False, extra=(demo,))
    assert [i.scheme for i in reg] == sorted([*BUILTIN_SCHEMES, "xor"])
    info = reg.info("xor")
    assert info.plugin == "demo_vmt_plugin"
    assert info.origin == "registered in code"
    assert info.transport is demo.XorTransport
    t = reg.resolve("xor:/some/where")
    assert isinstance(t, demo.XorTransport)
    assert t.uri.target == "/some/where"
    with pytest.raises(URIError, match="unknown option 'level'"):
        reg.resolve("xor:/x,level=3")
    # The plugin is in this registry only.
    assert "xor" not in Registry(entry_points=False)


async def test_extra_module_round_trip(tmp_path: Path) -> None:
    demo = load_fixture("demo_vmt_plugin")
    reg = Registry(entry_points=False, extra=(demo,))
    payload = os.urandom(100_000)
    path = tmp_path / "a.xor"
    sink = reg.resolve(f"xor:{path}").open_sink()
    sink.write(memoryview(payload))
    sink.commit()
    assert path.read_bytes() == bytes(b ^ 0x5A for b in payload)
    source = await reg.resolve(f"xor:{path}").open_source()
    buf = bytearray(len(payload) + 10)
    n = await source.readinto(memoryview(buf))
    assert await source.readinto(memoryview(buf)[n:]) == 0
    await source.commit()
    assert bytes(buf[:n]) == payload


@pytest.mark.fault(
    "plugin claiming a built-in scheme (in code)",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="left out (strict: PluginError)",
    message="'plugin ... not loaded: it claims the scheme 'file', which is 'builtin''s'",
)
def test_extra_module_claiming_a_builtin_scheme() -> None:
    clash = load_fixture("clash_vmt_plugin")
    reg = Registry(entry_points=False, extra=(clash,))
    assert reg.info("file").plugin == "builtin"  # the built-in keeps it
    assert [i.scheme for i in reg] == BUILTIN_SCHEMES
    (failure,) = reg.failures
    assert str(failure) == (
        "plugin 'clash_vmt_plugin' (registered in code) not loaded: it claims the scheme "
        "'file', which is 'builtin''s (built-in)"
    )
    assert not reg.plugin_manager.has_plugin("clash_vmt_plugin")
    with pytest.raises(PluginError, match="it claims the scheme 'file'"):
        Registry(entry_points=False, extra=(clash,), strict=True)


def test_two_plugins_claiming_one_scheme_the_first_keeps_it() -> None:
    demo = load_fixture("demo_vmt_plugin")

    class Other:
        @vmtransport.hookimpl
        def vmtransport_transports(self) -> Sequence[type[Transport]]:
            return [WrapTransport, type("Xor2", (WrapTransport,), {"scheme": "xor"})]

    reg = Registry(entry_points=False, extra=(demo, Other()))
    assert reg.info("xor").plugin == "demo_vmt_plugin"
    assert "wrap" not in reg  # the whole plugin is left out, not half of it
    assert [f.plugin for f in reg.failures] == ["extra-1"]
    assert "it claims the scheme 'xor', which is 'demo_vmt_plugin''s" in reg.failures[0].reason


@pytest.mark.fault(
    "plugin with a misspelled hook",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="left out (strict: PluginError)",
    message="'unknown hook ...' naming the plugin",
)
def test_plugin_with_a_misspelled_hook() -> None:
    class Typo:
        @vmtransport.hookimpl
        def vmtransport_transport(self) -> Sequence[type[Transport]]:
            return []

    reg = Registry(entry_points=False, extra=(Typo(),))
    (failure,) = reg.failures
    assert failure.plugin == "extra-0"
    assert "unknown hook 'vmtransport_transport'" in failure.reason
    assert [i.scheme for i in reg] == BUILTIN_SCHEMES
    with pytest.raises(PluginError) as info:
        Registry(entry_points=False, extra=(Typo(),), strict=True)
    assert "plugin 'extra-0'" in str(info.value)
    assert "unknown hook 'vmtransport_transport'" in str(info.value)


@pytest.mark.parametrize(
    ("returned", "error"),
    [
        ([int], r"plugin 'extra-0' .* it returned <class 'int'>, not a Transport"),
        (FileTransport, r"plugin 'extra-0' .* it returned <class '.*FileTransport'>, not a seq"),
        ("file", r"plugin 'extra-0' .* it returned 'file', not a sequence of Transports"),
    ],
)
@pytest.mark.fault(
    "plugin hook returning something other than Transports",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="left out (strict: PluginError)",
    message="names the plugin and what it returned",
)
def test_plugin_returning_something_else(returned: object, error: str) -> None:
    class Bad:
        @vmtransport.hookimpl
        def vmtransport_transports(self) -> object:
            return returned

    reg = Registry(entry_points=False, extra=(Bad(),))
    assert re.match(error, str(reg.failures[0]))
    assert [i.scheme for i in reg] == BUILTIN_SCHEMES
    with pytest.raises(PluginError, match=error):
        Registry(entry_points=False, extra=(Bad(),), strict=True)


@pytest.mark.fault(
    "plugin hook that raises",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="left out (strict: PluginError)",
    message="'plugin ... not loaded: vmtransport_transports() failed: <its error>'",
)
def test_plugin_whose_hook_raises() -> None:
    class Broken:
        @vmtransport.hookimpl
        def vmtransport_transports(self) -> Sequence[type[Transport]]:
            raise RuntimeError("libzstd.so.1: cannot open shared object file")

    reg = Registry(entry_points=False, extra=(Broken(),))
    assert [str(f) for f in reg.failures] == [
        "plugin 'extra-0' (registered in code) not loaded: vmtransport_transports() failed: "
        "libzstd.so.1: cannot open shared object file"
    ]
    assert reg.resolve("file:/x").uri.target == "/x"  # everything else works


# --- pluggy's hook caller: wrappers, tracing, monitoring, blocking ------------------------


def test_hook_wrapper_sees_filters_and_augments_each_plugins_transports() -> None:
    demo = load_fixture("demo_vmt_plugin")
    seen: list[tuple[str, list[str]]] = []
    Results = list[Sequence[type[Transport]]]

    class Wrapper:  # hides exec:, and adds wrap: beside the demo plugin's transports
        @vmtransport.hookimpl(wrapper=True)
        def vmtransport_transports(self, plugin_name: str) -> Generator[None, Results, Results]:
            results = yield
            seen.append((plugin_name, [cls.scheme for result in results for cls in result]))
            kept: Results = [[c for c in result if c.scheme != "exec"] for result in results]
            if plugin_name == "demo_vmt_plugin":
                kept.append([WrapTransport])
            return kept

    reg = Registry(entry_points=False, extra=(Wrapper(), demo))
    # Called once per providing plugin (never for the wrapper's own plugin), in order.
    assert seen == [
        ("builtin", ["file", "odirect", "fd", "exec"]),
        ("demo_vmt_plugin", ["xor"]),
    ]
    assert [i.scheme for i in reg] == ["fd", "file", "odirect", "wrap", "xor"]
    assert reg.info("wrap").plugin == "demo_vmt_plugin"  # what the wrapped call returned
    assert reg.info("wrap").origin == "registered in code"
    assert reg.info("file").plugin == "builtin"
    with pytest.raises(URIError, match="unknown scheme 'exec'"):
        reg.resolve("exec:true")


def test_hook_calls_are_traced_and_monitored() -> None:
    pm = pluggy.PluginManager("vmtransport")
    lines: list[str] = []
    pm.trace.root.setwriter(lines.append)
    pm.enable_tracing()
    calls: list[tuple[str, object, list[str | None]]] = []
    pm.add_hookcall_monitoring(
        lambda hook, impls, kwargs: calls.append(
            (hook, kwargs["plugin_name"], [pm.get_name(i.plugin) for i in impls])
        ),
        lambda outcome, hook, impls, kwargs: None,
    )
    demo = load_fixture("demo_vmt_plugin")
    reg = Registry(entry_points=False, extra=(demo,), plugin_manager=pm)
    assert reg.plugin_manager is pm
    assert "xor" in reg
    assert calls == [
        ("vmtransport_transports", "builtin", ["builtin"]),
        ("vmtransport_transports", "demo_vmt_plugin", ["demo_vmt_plugin"]),
    ]
    trace = "".join(lines)
    assert trace.count("vmtransport_transports [hook]") == 2
    assert "plugin_name: builtin" in trace
    assert "plugin_name: demo_vmt_plugin" in trace
    assert "finish vmtransport_transports --> [[<class 'demo_vmt_plugin.XorTransport'>]]" in trace


def test_plugin_manager_of_another_project() -> None:
    with pytest.raises(ValueError, match="plugin manager of project 'pytest', not 'vmtransport'"):
        Registry(plugin_manager=pluggy.PluginManager("pytest"))


def test_builtins_cannot_be_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    pm = pluggy.PluginManager("vmtransport")
    pm.set_blocked("builtin")
    with pytest.raises(PluginError, match="the built-in transports cannot be blocked"):
        Registry(entry_points=False, plugin_manager=pm)
    for value in ("builtin", "all"):
        monkeypatch.setenv("VMTRANSPORT_DISABLE_PLUGINS", value)
        reg = Registry()
        assert not reg.plugin_manager.is_blocked("builtin")
        assert [i.scheme for i in reg if i.plugin == "builtin"] == BUILTIN_SCHEMES


# --- a transport wrapping another, through the registry that resolved it -------------------

_FLIP = bytes(b ^ 0xA5 for b in range(256))


@final
class WrapSink(Sink):
    def __init__(self, inner: Sink) -> None:
        self._inner = inner

    def write(self, data: memoryview) -> None:
        self._inner.write(memoryview(bytes(data).translate(_FLIP)))

    def commit(self) -> None:
        self._inner.commit()

    def abort(self) -> None:
        self._inner.abort()


@final
class WrapSource(Source):
    def __init__(self, inner: Source) -> None:
        self._inner = inner

    async def readinto(self, buf: memoryview) -> int:
        n = await self._inner.readinto(buf)
        buf[:n] = bytes(buf[:n]).translate(_FLIP)
        return n

    async def commit(self) -> None:
        await self._inner.commit()

    async def abort(self) -> None:
        await self._inner.abort()


@final
class WrapTransport(Transport):
    """``wrap:INNER-URI``: the inner transport's stream with every byte XORed with 0xA5."""

    scheme = "wrap"
    summary = "test: XORs the stream of the transport it wraps"
    raw_target = True

    def __init__(self, uri: vmtransport.URI) -> None:
        super().__init__(uri)
        self.inner = self.registry.resolve(uri.target)

    def open_sink(self) -> Sink:
        return WrapSink(self.inner.open_sink())

    async def open_source(self) -> Source:
        return WrapSource(await self.inner.open_source())


class WrapPlugin:
    @vmtransport.hookimpl
    def vmtransport_transports(self) -> Sequence[type[Transport]]:
        return [WrapTransport]


async def test_wrapping_transport_resolves_its_inner_uri_through_its_registry(
    tmp_path: Path,
) -> None:
    demo = load_fixture("demo_vmt_plugin")
    reg = Registry(entry_points=False, extra=(demo, WrapPlugin()))
    assert reg is not vmtransport.get_registry()
    assert "xor" not in vmtransport.get_registry()  # only this registry knows the inner one
    path = tmp_path / "vm.xor"
    uri = f"wrap:xor:{path}"
    t = reg.resolve(uri)
    assert isinstance(t, WrapTransport)
    assert t.registry is reg
    assert isinstance(t.inner, demo.XorTransport)
    assert t.inner.registry is reg
    payload = os.urandom(300_000)
    sink = t.open_sink()
    sink.write(memoryview(payload)[:200_000])
    sink.write(memoryview(payload)[200_000:])
    sink.commit()
    assert path.read_bytes() == bytes(b ^ 0x5A ^ 0xA5 for b in payload)  # both XORs
    source = await reg.resolve(uri).open_source()
    buf = bytearray(len(payload) + 1)
    got = 0
    while n := await source.readinto(memoryview(buf)[got:]):
        got += n
    await source.commit()
    assert bytes(buf[:got]) == payload
    # Nested: wrap:wrap: XORs twice with 0xA5, leaving only xor:'s 0x5A in the file.
    twice = reg.resolve(f"wrap:wrap:xor:{tmp_path / 'twice.xor'}")
    sink = twice.open_sink()
    sink.write(memoryview(payload))
    sink.commit()
    assert (tmp_path / "twice.xor").read_bytes() == bytes(b ^ 0x5A for b in payload)
    # A bad inner URI fails the wrapper's construction, naming the inner URI.
    with pytest.raises(URIError, match=r"unknown scheme 'nfs' in URI 'nfs:/x' \(known: "):
        reg.resolve("wrap:nfs:/x")
    # Constructed directly (even after those failures), a transport gets the process
    # registry, which lacks xor:.
    with pytest.raises(URIError, match="unknown scheme 'xor'"):
        WrapTransport(WrapTransport.parse(uri))
    assert FileTransport(FileTransport.parse("file:/x")).registry is vmtransport.get_registry()


# --- entry points, in-process ------------------------------------------------------------------


def test_entry_point_in_process(
    demo_site: Path, on_sys_path: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(demo_site))
    on_sys_path.append(demo_site)
    # Disabled: a name blocked in pluggy's plugin manager, whose module is never imported.
    for value in ("other, demo", "all"):
        monkeypatch.setenv("VMTRANSPORT_DISABLE_PLUGINS", value)
        reg = Registry()
        assert reg.plugin_manager.is_blocked("demo")
        assert reg.plugin_manager.get_plugin("demo") is None
        others = [] if value == "all" else INSTALLED
        assert [i.scheme for i in reg] == sorted([*BUILTIN_SCHEMES, *others])
        assert "demo_vmt_plugin" not in sys.modules
    monkeypatch.delenv("VMTRANSPORT_DISABLE_PLUGINS")
    pm = pluggy.PluginManager("vmtransport")
    pm.set_blocked("demo")  # blocked by the caller, the pluggy way
    assert "xor" not in Registry(plugin_manager=pm)
    assert "demo_vmt_plugin" not in sys.modules

    reg = Registry()
    assert not reg.plugin_manager.is_blocked("demo")
    info = reg.info("xor")
    assert info.plugin == "demo"
    assert info.origin == "entry point demo (demo-plugin 1.0)"
    assert reg.plugin_manager.get_plugin("demo") is sys.modules["demo_vmt_plugin"]
    assert "xor" not in Registry(entry_points=False)


# --- entry points, through the real command ----------------------------------------------------


def test_cli_plugins_lists_the_entry_point(demo_site: Path) -> None:
    r = vmt("plugins", env=env_with(demo_site))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    schemes = sorted([*BUILTIN_SCHEMES, *INSTALLED, "xor"])
    assert [line.split()[0] for line in lines] == [f"{s}:" for s in schemes]
    xor = next(line for line in lines if line.startswith("xor:"))
    assert xor.split()[1] == "demo"
    assert "entry point demo (demo-plugin 1.0)" in xor
    assert "XORed with 0x5A" in xor
    file_line = next(line for line in lines if line.startswith("file:"))
    assert file_line.split()[1:3] == ["builtin", "built-in"]


def test_cli_save_and_restore_through_the_plugin(demo_site: Path, tmp_path: Path) -> None:
    env = env_with(demo_site)
    payload = bytes(SyntheticStream(700, seed=5))  # save and restore want a QEMU stream
    image = tmp_path / "vm.xor"
    r = vmt("save", f"xor:{image}", env=env, input=payload)
    assert r.returncode == 0, r.stderr
    stored = image.read_bytes()
    assert len(stored) == len(payload)
    assert stored == bytes(b ^ 0x5A for b in payload)  # the plugin wrote it, not file:
    r = vmt("restore", f"xor:{image}", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == payload
    # copy between the plugin's scheme and a built-in one, both ways
    plain = tmp_path / "vm.raw"
    r = vmt("copy", f"xor:{image}", f"file:{plain},format=raw", env=env)
    assert r.returncode == 0, r.stderr
    assert plain.read_bytes() == payload
    again = tmp_path / "again.xor"
    r = vmt("copy", f"file:{plain}", f"xor:{again}", env=env)
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == stored


@pytest.mark.fault(
    "URI of a scheme no plugin provides",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="2",
    message="'unknown scheme ...'",
)
def test_cli_without_the_plugin_does_not_know_the_scheme(tmp_path: Path) -> None:
    r = vmt("restore", f"xor:{tmp_path / 'x'}", env=env_with(None))
    assert r.returncode == 2
    assert b"unknown scheme 'xor'" in r.stderr


def test_cli_disable_plugins_hides_it(demo_site: Path, tmp_path: Path) -> None:
    for value in ("demo", "x, demo"):
        env = env_with(demo_site, VMTRANSPORT_DISABLE_PLUGINS=value)
        r = vmt("plugins", env=env)
        assert r.returncode == 0, r.stderr
        assert [line.split()[0] for line in r.stdout.decode().splitlines()] == [
            f"{s}:" for s in sorted([*BUILTIN_SCHEMES, *INSTALLED])
        ]
    r = vmt("save", f"xor:{tmp_path / 'x'}", env=env, input=b"abc")
    assert r.returncode == 2
    assert b"unknown scheme 'xor'" in r.stderr
    assert not (tmp_path / "x").exists()
    # Disabling some other name leaves it in.
    r = vmt("plugins", env=env_with(demo_site, VMTRANSPORT_DISABLE_PLUGINS="other"))
    assert b"xor:" in r.stdout


@pytest.mark.fault(
    "installed plugin claiming file:",
    direction="cli",
    vm="n/a",
    disk="the built-in file: writes it",
    exit="0 (the plugin left out)",
    message="one warning: 'plugin 'demo' (...) not loaded: it claims the scheme 'file', ...'",
)
def test_cli_plugin_claiming_file_is_refused(clash_site: Path, tmp_path: Path) -> None:
    env = env_with(clash_site)
    payload = bytes(SyntheticStream(700, seed=5))
    for args in (("plugins",), ("save", f"file:{tmp_path / 'x'}")):
        r = vmt(*args, env=env, input=payload)
        assert r.returncode == 0, r.stderr
        lines = r.stderr.decode().splitlines()
        assert lines == [
            "vmtransport: WARNING: plugin 'demo' (entry point demo (clash-plugin 1.0)) not "
            "loaded: it claims the scheme 'file', which is 'builtin''s (built-in)"
        ], lines
    assert (tmp_path / "x").stat().st_size > len(payload)  # an image, by the built-in
    r = vmt("plugins", "--json", env=env)
    doc = json.loads(r.stdout)
    demo = next(p for p in doc["plugins"] if p["name"] == "demo")
    assert demo["loaded"] is False and demo["version"] == "1.0"
    assert "it claims the scheme 'file'" in demo["reason"]
    # Disabling it: no warning.
    r = vmt("plugins", env=env_with(clash_site, VMTRANSPORT_DISABLE_PLUGINS="demo"))
    assert r.returncode == 0 and r.stderr == b"", r.stderr


@pytest.mark.fault(
    "installed plugin that cannot be imported",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="0 (the plugin left out)",
    message="one warning: 'plugin 'broken' (...) not loaded: cannot import ...', the ImportError",
)
def test_cli_plugin_that_cannot_be_imported(demo_site: Path, tmp_path: Path) -> None:
    info = demo_site / "broken_plugin-2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text("[vmtransport]\nbroken = no_such_module_vmt\n")
    try:
        r = vmt("plugins", env=env_with(demo_site))
        assert r.returncode == 0, r.stderr
        lines = r.stderr.decode().splitlines()
        assert len(lines) == 1, lines  # reported once
        assert "plugin 'broken' (entry point broken (broken-plugin 2.0)) not loaded" in lines[0]
        assert "cannot import no_such_module_vmt: No module named 'no_such_module_vmt'" in lines[0]
        assert b"xor:" in r.stdout  # every other plugin still works
        assert b"not loaded: broken" in r.stdout
        r = vmt("plugins", env=env_with(demo_site, VMTRANSPORT_DISABLE_PLUGINS="broken"))
        assert r.returncode == 0 and r.stderr == b"", r.stderr
    finally:
        shutil.rmtree(info)


def test_cli_plugins_json(demo_site: Path) -> None:
    r = vmt("plugins", "--json", env=env_with(demo_site))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "vmtransport-plugins/1"
    by_name = {p["name"]: p for p in doc["plugins"]}
    assert by_name["builtin"]["origin"] == "built-in"
    assert [s["scheme"] for s in by_name["builtin"]["schemes"]] == BUILTIN_SCHEMES
    demo = by_name["demo"]
    assert demo["version"] == "1.0" and demo["loaded"] is True
    assert demo["origin"] == "entry point demo (demo-plugin 1.0)"
    assert [s["scheme"] for s in demo["schemes"]] == ["xor"]
