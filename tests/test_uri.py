"""URI parsing: ``scheme:target[,key=value...]``, QEMU's ``,,`` escape, raw targets,
immutability, and the errors, which quote the offending text; then the checks the
registry and the transports add (unknown scheme, unknown option, option values)."""

from __future__ import annotations

import pytest

from vmtransport import URI, Registry, Transport, URIError, UsageError, parse_uri
from vmtransport.transports import (
    ExecTransport,
    FdTransport,
    FileTransport,
    ODirectTransport,
)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(entry_points=False)


# --- parse_uri: the syntax --------------------------------------------------------------


def test_scheme_and_target() -> None:
    uri = parse_uri("file:/var/lib/a.sav")
    assert uri.scheme == "file"
    assert uri.target == "/var/lib/a.sav"
    assert dict(uri.options) == {}
    assert str(uri) == "file:/var/lib/a.sav"


def test_only_the_first_colon_separates_the_scheme() -> None:
    uri = parse_uri("file:/a:b:c")
    assert (uri.scheme, uri.target) == ("file", "/a:b:c")


def test_options_follow_the_target() -> None:
    uri = parse_uri("odirect:/x.sav,offset=4096,fallback=error")
    assert uri.target == "/x.sav"
    assert dict(uri.options) == {"offset": "4096", "fallback": "error"}
    assert str(uri) == "odirect:/x.sav,offset=4096,fallback=error"


def test_option_value_may_be_empty_or_hold_equals_signs() -> None:
    uri = parse_uri("file:/x,a=,b=c=d")
    assert dict(uri.options) == {"a": "", "b": "c=d"}


@pytest.mark.parametrize(
    ("text", "target", "options"),
    [
        ("file:/a,,b", "/a,b", {}),
        ("file:/a,,b,offset=7", "/a,b", {"offset": "7"}),
        ("file:/a,,,offset=7", "/a,", {"offset": "7"}),
        ("file:,,lead", ",lead", {}),
        ("file:/trail,,", "/trail,", {}),
        ("file:/a,,,,b", "/a,,b", {}),
        ("file:/x,k=v,,w", "/x", {"k": "v,w"}),
    ],
)
def test_double_comma_is_a_literal_comma(text: str, target: str, options: dict[str, str]) -> None:
    uri = parse_uri(text)
    assert uri.target == target
    assert dict(uri.options) == options


def test_raw_target_keeps_everything_verbatim() -> None:
    text = "exec:gzip -c > /tmp/a,b,,c,offset=1"
    uri = parse_uri(text, raw=True)
    assert uri.scheme == "exec"
    assert uri.target == "gzip -c > /tmp/a,b,,c,offset=1"
    assert dict(uri.options) == {}
    # The same text parsed with options would have been cut at the first single comma.
    assert parse_uri("file:/tmp/a,b=1").target == "/tmp/a"


def test_exec_transport_parses_raw(registry: Registry) -> None:
    t = registry.resolve("exec:cat a,b ,, c > d")
    assert isinstance(t, ExecTransport)
    assert t.uri.target == "cat a,b ,, c > d"
    assert dict(t.uri.options) == {}


# --- immutability and value semantics ---------------------------------------------------


def test_uri_is_frozen() -> None:
    uri = parse_uri("file:/x,offset=1")
    with pytest.raises(AttributeError):
        uri.target = "/y"
    with pytest.raises(AttributeError):
        uri.options = {}
    assert uri.target == "/x"


def test_options_mapping_is_read_only() -> None:
    uri = parse_uri("file:/x,offset=1")
    with pytest.raises(TypeError):
        uri.options["offset"] = "2"  # type: ignore[index]
    with pytest.raises(TypeError):
        del uri.options["offset"]  # type: ignore[attr-defined]
    assert not hasattr(uri.options, "update")
    assert dict(uri.options) == {"offset": "1"}


def test_equality_and_hash_ignore_option_order_and_spelling() -> None:
    a = parse_uri("odirect:/x,offset=4096,fallback=error")
    b = parse_uri("odirect:/x,fallback=error,offset=4096")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert str(a) != str(b)  # each keeps the text it was parsed from
    assert a != parse_uri("odirect:/x,offset=4096")
    assert a != parse_uri("file:/x,offset=4096,fallback=error")
    assert a != "odirect:/x,offset=4096,fallback=error"


def test_constructed_uri_str() -> None:
    assert str(URI("file", "/x")) == "file:/x"
    assert dict(URI("file", "/x").options) == {}


def test_constructed_uri_copies_its_options() -> None:
    opts = {"offset": "1"}
    uri = URI("file", "/x", opts)
    opts["offset"] = "2"
    assert uri.options["offset"] == "1"
    with pytest.raises(TypeError):
        uri.options["offset"] = "3"  # type: ignore[index]
    with pytest.raises(AttributeError):
        del uri.scheme
    assert uri == parse_uri("file:/x,offset=1")


# --- parse errors: each quotes the text ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no-colon-here", "not a URI 'no-colon-here'"),
        ("", "not a URI ''"),
        (":/x", "not a URI ':/x'"),
        ("file:", "empty target in URI 'file:'"),
        ("file:,offset=1", "empty target in URI 'file:,offset=1'"),
        ("File:/x", "bad scheme 'File' in URI 'File:/x'"),
        ("1file:/x", "bad scheme '1file' in URI '1file:/x'"),
        ("fi le:/x", "bad scheme 'fi le' in URI 'fi le:/x'"),
        ("file:/x,offset", "malformed option 'offset' in URI 'file:/x,offset'"),
        ("file:/x,", "malformed option '' in URI 'file:/x,'"),
        ("file:/x,=1", "malformed option '=1' in URI 'file:/x,=1'"),
        ("file:/x,Offset=1", "malformed option 'Offset=1' in URI 'file:/x,Offset=1'"),
        ("file:/x,a b=1", "malformed option 'a b=1' in URI 'file:/x,a b=1'"),
        (
            "file:/x,offset=1,offset=2",
            "option 'offset' given twice in URI 'file:/x,offset=1,offset=2'",
        ),
    ],
)
@pytest.mark.fault(
    "malformed URI text",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="URIError",
    message="quotes the text and the reason",
)
def test_parse_errors_quote_the_text(text: str, expected: str) -> None:
    with pytest.raises(URIError) as info:
        parse_uri(text)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UsageError)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("text", ["exec:", "exec:   ", "exec:\t"])
def test_raw_empty_target(text: str) -> None:
    with pytest.raises(URIError, match="empty target in URI"):
        parse_uri(text, raw=True)


def test_no_colon_error_shows_an_example() -> None:
    with pytest.raises(URIError, match=r"expected SCHEME:TARGET"):
        parse_uri("/var/lib/a.sav")


# --- through the registry and the transports ----------------------------------------------


def test_resolve_builds_the_transport(registry: Registry) -> None:
    assert isinstance(registry.resolve("file:/x"), FileTransport)
    assert isinstance(registry.resolve("odirect:/x"), ODirectTransport)
    assert isinstance(registry.resolve("fd:3"), FdTransport)
    assert isinstance(registry.resolve("exec:true"), ExecTransport)


def test_unknown_scheme_lists_known_ones(registry: Registry) -> None:
    with pytest.raises(URIError) as info:
        registry.resolve("nfs:/srv/a.sav")
    msg = str(info.value)
    assert "unknown scheme 'nfs'" in msg
    assert "'nfs:/srv/a.sav'" in msg
    assert "(known: exec, fd, file, odirect)" in msg


def test_info_of_unknown_scheme(registry: Registry) -> None:
    with pytest.raises(URIError, match=r"unknown scheme 'tcp' \(known: exec, fd, file, odirect\)"):
        registry.info("tcp")
    assert registry.info("file").transport is FileTransport


def test_resolve_rejects_a_text_that_is_no_uri(registry: Registry) -> None:
    with pytest.raises(URIError, match=r"not a URI '/x\.sav'"):
        registry.resolve("/x.sav")


@pytest.mark.parametrize(
    ("text", "transport", "option"),
    [
        ("file:/x,direct=1", FileTransport, "direct"),
        ("odirect:/x,sync=1", ODirectTransport, "sync"),
        ("fd:3,offset=0", FdTransport, "offset"),
    ],
)
@pytest.mark.fault(
    "unknown URI option",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="URIError",
    message="names it and lists the known ones",
)
def test_unknown_option_names_it_and_lists_known(
    registry: Registry, text: str, transport: type[Transport], option: str
) -> None:
    with pytest.raises(URIError) as info:
        registry.resolve(text)
    known = ", ".join(sorted(transport.options)) or "none"
    assert f"unknown option {option!r} in URI {text!r} (known: {known})" in str(info.value)


def test_options_are_documented() -> None:
    assert "offset" in FileTransport.options
    assert {"offset", "fallback"} <= set(ODirectTransport.options)
    assert dict(FdTransport.options) == {}
    for transport in (FileTransport, ODirectTransport, ExecTransport, FdTransport):
        for help_text in transport.options.values():
            assert help_text


@pytest.mark.parametrize("value", ["-1", "abc", "", "1.5", "4k", "-0x10"])
@pytest.mark.parametrize("scheme", ["file", "odirect"])
@pytest.mark.fault(
    "offset= not a non-negative integer",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="URIError",
    message="names the option and the URI",
)
def test_bad_offset_values(registry: Registry, scheme: str, value: str) -> None:
    text = f"{scheme}:/x,offset={value}"
    with pytest.raises(URIError) as info:
        registry.resolve(text)
    msg = str(info.value)
    assert f"option offset={value!r}" in msg
    assert repr(text) in msg
    assert "expected a non-negative integer" in msg


@pytest.mark.parametrize(("value", "offset"), [("0", 0), ("12345", 12345), ("0x1000", 4096)])
def test_file_offset_values(registry: Registry, value: str, offset: int) -> None:
    t = registry.resolve(f"file:/x,offset={value}")
    assert isinstance(t, FileTransport)
    assert t.offset == offset


@pytest.mark.parametrize("value", ["1", "512", "1000", "4095", "6144"])
@pytest.mark.fault(
    "odirect: offset= not a multiple of 4096",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="URIError",
    message="'must be a multiple of 4096'",
)
def test_odirect_offset_must_be_a_multiple_of_4096(registry: Registry, value: str) -> None:
    with pytest.raises(URIError) as info:
        registry.resolve(f"odirect:/x,offset={value}")
    assert f"option offset={value!r}" in str(info.value)
    assert "must be a multiple of 4096" in str(info.value)


@pytest.mark.parametrize(("value", "offset"), [("0", 0), ("4096", 4096), ("1048576", 1 << 20)])
def test_odirect_aligned_offsets(registry: Registry, value: str, offset: int) -> None:
    t = registry.resolve(f"odirect:/x,offset={value}")
    assert isinstance(t, ODirectTransport)
    assert t.offset == offset


def test_odirect_fallback_choice(registry: Registry) -> None:
    default = registry.resolve("odirect:/x")
    assert isinstance(default, ODirectTransport)
    assert default.fallback == "buffered"
    for choice in ("buffered", "error"):
        t = registry.resolve(f"odirect:/x,fallback={choice}")
        assert isinstance(t, ODirectTransport)
        assert t.fallback == choice
    with pytest.raises(URIError) as info:
        registry.resolve("odirect:/x,fallback=maybe")
    msg = str(info.value)
    assert "option fallback='maybe'" in msg
    assert "expected one of buffered, error" in msg


@pytest.mark.parametrize("target", ["-1", "3x", "a/b", "3 ", "na:me"])
@pytest.mark.fault(
    "fd: target neither a number nor a name",
    direction="cli",
    vm="n/a",
    disk="n/a",
    exit="URIError",
    message="names the URI",
)
def test_fd_target_must_be_a_number_or_a_name(registry: Registry, target: str) -> None:
    with pytest.raises(URIError, match="expected a number or a name"):
        registry.resolve(f"fd:{target}")


@pytest.mark.parametrize("target", ["0", "3", "17", "migration", "state_1.x-y"])
def test_fd_targets_accepted(registry: Registry, target: str) -> None:
    t = registry.resolve(f"fd:{target}")
    assert t.uri.target == target


def test_transport_refuses_a_foreign_scheme() -> None:
    with pytest.raises(URIError, match="transport 'file' cannot handle 'odirect'"):
        FileTransport(parse_uri("odirect:/x"))
