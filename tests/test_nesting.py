"""A transport that wraps another: ``SCHEME[,key=value...]:INNER-URI``.

The syntax (options after the scheme for verbatim targets, the inner URI as written
alone), then resolution through :class:`vmtransport.WrappingTransport`: any inner scheme,
the registry that resolved the outer URI, nesting, errors naming the whole URI, and a
real round trip through files and an ``exec:`` pipe.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, final

import pytest

import vmtransport
from vmtransport import (
    URI,
    Registry,
    Sink,
    Source,
    Transport,
    URIError,
    WrappingTransport,
    parse_uri,
)
from vmtransport.transports import ExecTransport, FileTransport, ODirectTransport

# --- the syntax -------------------------------------------------------------------------


def test_inner_uri_is_the_target_verbatim() -> None:
    uri = parse_uri("zstd:odirect:/var/lib/a,,b.sav,fallback=error", raw=True)
    assert (uri.scheme, uri.target) == ("zstd", "odirect:/var/lib/a,,b.sav,fallback=error")
    assert dict(uri.options) == {}
    assert str(uri) == "zstd:odirect:/var/lib/a,,b.sav,fallback=error"


def test_options_of_a_verbatim_target_go_after_the_scheme() -> None:
    uri = parse_uri("zstd,level=9,threads=2:file:/x:y,offset=4096", raw=True)
    assert uri.scheme == "zstd"
    assert dict(uri.options) == {"level": "9", "threads": "2"}
    assert uri.target == "file:/x:y,offset=4096"
    # ,, escapes a comma there too; = may appear in a value
    uri = parse_uri("exec,env=A,,B=1:cat > /x", raw=True)
    assert dict(uri.options) == {"env": "A,B=1"}
    assert uri.target == "cat > /x"


def test_nested_heads_belong_to_their_own_level() -> None:
    outer = parse_uri("a,k=1:b,k=2:file:/x,offset=7", raw=True)
    assert dict(outer.options) == {"k": "1"}
    inner = parse_uri(outer.target, raw=True)
    assert dict(inner.options) == {"k": "2"}
    innermost = parse_uri(inner.target)
    assert (innermost.target, dict(innermost.options)) == ("/x", {"offset": "7"})


@pytest.mark.parametrize(
    ("text", "raw", "expected"),
    [
        (
            "file,offset=1:/x",
            False,
            "option 'offset=1' before the target in URI 'file,offset=1:/x': file: takes "
            "its options after the target (file:TARGET,key=value)",
        ),
        ("zstd,level:file:/x", True, "malformed option 'level' in URI 'zstd,level:file:/x'"),
        ("zstd,:file:/x", True, "malformed option '' in URI 'zstd,:file:/x'"),
        ("zstd,a=1,a=2:file:/x", True, "option 'a' given twice in URI 'zstd,a=1,a=2:file:/x'"),
        ("zstd,level=1:", True, "empty target in URI 'zstd,level=1:'"),
        (",level=1:file:/x", True, "bad scheme '' in URI ',level=1:file:/x'"),
    ],
)
def test_head_errors_quote_the_text(text: str, raw: bool, expected: str) -> None:
    with pytest.raises(URIError) as info:
        parse_uri(text, raw=raw)
    assert expected in str(info.value)


def test_split_scheme_leaves_the_head_options_out() -> None:
    from vmtransport._uri import split_scheme

    assert split_scheme("zstd,level=3:odirect:/x") == ("zstd", "odirect:/x")


# --- resolution -------------------------------------------------------------------------


@final
class CountSink(Sink):
    def __init__(self, inner: Sink, seen: list[int]) -> None:
        self._inner, self._seen = inner, seen

    def write(self, data: memoryview) -> None:
        self._seen.append(len(data))
        self._inner.write(data)

    def commit(self) -> None:
        self._inner.commit()

    def abort(self) -> None:
        self._inner.abort()

    def cancel(self) -> None:
        self._inner.cancel()


@final
class CountTransport(WrappingTransport):
    """``count[,tag=T]:INNER-URI``: the inner stream unchanged; counts the writes."""

    scheme = "count"
    options: ClassVar[Mapping[str, str]] = {"tag": "a label"}
    writes: ClassVar[list[int]] = []

    def open_sink(self) -> Sink:
        return CountSink(self.inner.open_sink(), self.writes)

    async def open_source(self) -> Source:
        return await self.inner.open_source()


class CountPlugin:
    @vmtransport.hookimpl
    def vmtransport_transports(self) -> Sequence[type[Transport]]:
        return [CountTransport]


@pytest.fixture
def registry() -> Registry:
    return Registry(entry_points=False, extra=(CountPlugin(),))


def test_any_inner_scheme_with_its_own_options(registry: Registry) -> None:
    t = registry.resolve("count,tag=outer:odirect:/x,,y.sav,fallback=error,format=raw")
    assert isinstance(t, CountTransport)
    assert t.uri.options["tag"] == "outer"
    assert isinstance(t.inner, ODirectTransport)
    assert t.inner.uri.target == "/x,y.sav"
    assert t.inner.fallback == "error"
    assert t.save_format == "raw" == t.inner.save_format
    assert t.inner.registry is registry
    assert registry.resolve("count:file:/x").save_format == "image"
    e = registry.resolve("count:exec:cat > /a,b ,, c")
    assert isinstance(e, CountTransport) and isinstance(e.inner, ExecTransport)
    assert e.inner.uri.target == "cat > /a,b ,, c"


def test_nesting_more_than_once(registry: Registry) -> None:
    t = registry.resolve("count,tag=1:count,tag=2:count:file:/x")
    levels = []
    while isinstance(t, CountTransport):
        levels.append(dict(t.uri.options))
        t = t.inner
    assert levels == [{"tag": "1"}, {"tag": "2"}, {}]
    assert isinstance(t, FileTransport) and t.uri.target == "/x"
    from vmtransport._transport import MAX_NESTING

    ok = "count:" * MAX_NESTING + "file:/x"
    assert isinstance(registry.resolve(ok), CountTransport)
    with pytest.raises(URIError, match=f"nests more than {MAX_NESTING} transports"):
        registry.resolve("count:" + ok)
    # the counter is per construction: a failure leaves nothing behind
    assert isinstance(registry.resolve(ok), CountTransport)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "count:nfs:/x",
            "unknown scheme 'nfs' in URI 'nfs:/x' (known: count, exec, fd, file, odirect), "
            "inside URI 'count:nfs:/x'",
        ),
        (
            "count:count:/x.sav",
            "not a URI '/x.sav': expected SCHEME:TARGET, e.g. odirect:/var/lib/a.sav, "
            "inside URI 'count:count:/x.sav'",
        ),
        (
            "count:file:/x,level=3",
            "unknown option 'level' in URI 'file:/x,level=3' (known: format, offset), "
            "inside URI 'count:file:/x,level=3'",
        ),
        ("count,level=3:file:/x", "unknown option 'level' in URI 'count,level=3:file:/x'"),
    ],
)
def test_errors_name_the_inner_and_the_whole_uri(
    registry: Registry, text: str, expected: str
) -> None:
    with pytest.raises(URIError) as info:
        registry.resolve(text)
    assert str(info.value) == expected or expected in str(info.value)
    assert "\n" not in str(info.value)


def test_the_wrapper_uses_the_registry_that_resolved_it(registry: Registry) -> None:
    # count: is only in this registry: nested inside itself it resolves there too
    assert "count" not in vmtransport.get_registry()
    t = registry.resolve("count:count:fd:3")
    assert isinstance(t, CountTransport) and isinstance(t.inner, CountTransport)
    assert t.inner.registry is registry
    # constructed directly, a wrapper gets the process registry, which lacks count:
    with pytest.raises(URIError, match="unknown scheme 'count'"):
        CountTransport(URI("count", "count:file:/x", text="count:count:file:/x"))


async def test_round_trip_through_a_wrapper(registry: Registry, tmp_path: Path) -> None:
    payload = os.urandom(300_001)
    CountTransport.writes.clear()
    path = tmp_path / "a,b.raw"
    uri = f"count:count:file:{str(path).replace(',', ',,')},format=raw"
    sink = registry.resolve(uri).open_sink()
    sink.write(memoryview(payload)[:100_000])
    sink.write(memoryview(payload)[100_000:])
    sink.commit()
    assert CountTransport.writes == [100_000, 100_000, 200_001, 200_001]
    assert path.read_bytes() == payload
    assert (path.stat().st_mode & 0o777) == 0o600
    source = await registry.resolve(uri).open_source()
    got = bytearray()
    buf = bytearray(65536)
    while n := await source.readinto(memoryview(buf)):
        got += buf[:n]
    await source.commit()
    assert bytes(got) == payload
    # through an exec: pipe: the inner command line is taken as written
    out = tmp_path / "piped"
    sink = registry.resolve(f"count:exec:cat > {out}").open_sink()
    sink.write(memoryview(payload))
    sink.commit()
    assert out.read_bytes() == payload
