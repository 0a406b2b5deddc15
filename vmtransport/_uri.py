"""Parse ``scheme:target[,key=value...]`` into an immutable value. No I/O here.

QEMU's option syntax: options follow the target after commas, and a literal comma
inside the target is written twice (``file:/a,,b`` is the file ``/a,b``). Schemes
whose target is taken verbatim (``raw=True``: a command line for ``exec:``, another URI
for a wrapping transport such as ``zstd:odirect:/x.sav``) cannot have options after it:
theirs go after the scheme instead, before the first colon
(``zstd,level=9:odirect:/x.sav,fallback=error``). A scheme never holds a comma or a
colon, so the head is unambiguous, and the inner URI is written as it would be alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import final

from ._errors import URIError

_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*\Z")
_KEY = re.compile(r"[a-z][a-z0-9_\-]*\Z")


@final
class URI:
    """A parsed transport URI: immutable; ``options`` is a read-only mapping."""

    __slots__ = ("options", "scheme", "target", "text")
    scheme: str
    target: str
    options: Mapping[str, str]
    text: str

    def __init__(
        self, scheme: str, target: str, options: Mapping[str, str] | None = None, text: str = ""
    ) -> None:
        for k, v in (("scheme", scheme), ("target", target), ("text", text)):
            object.__setattr__(self, k, v)
        object.__setattr__(self, "options", MappingProxyType(dict(options or {})))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"URI is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"URI is immutable: cannot delete {name!r}")

    def __str__(self) -> str:
        return self.text or f"{self.scheme}:{self.target}"

    def __repr__(self) -> str:
        return f"URI({self.scheme!r}, {self.target!r}, {dict(self.options)!r})"

    def __hash__(self) -> int:
        return hash((self.scheme, self.target, tuple(sorted(self.options.items()))))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, URI):
            return NotImplemented
        return (self.scheme, self.target, dict(self.options)) == (
            other.scheme,
            other.target,
            dict(other.options),
        )


def _split_head(text: str) -> tuple[str, list[str], str]:
    """``(scheme, options written after it, rest)`` of ``SCHEME[,key=value...]:REST``."""
    head, sep, rest = text.partition(":")
    if not sep or not head:
        raise URIError(f"not a URI {text!r}: expected SCHEME:TARGET, e.g. odirect:/var/lib/a.sav")
    scheme, *options = _segments(head)
    if not _SCHEME.match(scheme):
        raise URIError(f"bad scheme {scheme!r} in URI {text!r}")
    return scheme, options, rest


def split_scheme(text: str) -> tuple[str, str]:
    """Return ``(scheme, rest)`` (options after the scheme left out); raise URIError
    quoting ``text`` when it has no scheme."""
    scheme, _, rest = _split_head(text)
    return scheme, rest


def _options(opts: list[str], text: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or not _KEY.match(key):
            raise URIError(f"malformed option {opt!r} in URI {text!r}: expected key=value")
        if key in options:
            raise URIError(f"option {key!r} given twice in URI {text!r}")
        options[key] = value
    return options


def _segments(rest: str) -> Iterator[str]:
    """Split on single commas; ``,,`` is an escaped comma."""
    buf: list[str] = []
    i = 0
    while i < len(rest):
        c = rest[i]
        if c == ",":
            if rest.startswith(",,", i):
                buf.append(",")
                i += 2
                continue
            yield "".join(buf)
            buf = []
        else:
            buf.append(c)
        i += 1
    yield "".join(buf)


def parse_uri(text: str, *, raw: bool = False) -> URI:
    """Parse ``text``. With ``raw`` the whole rest after the first colon is the target
    and options come only after the scheme (``SCHEME,key=value:TARGET``); without, only
    after the target."""
    scheme, head, rest = _split_head(text)
    if raw:
        if not rest.strip():
            raise URIError(f"empty target in URI {text!r}")
        return URI(scheme, rest, _options(head, text), text)
    if head:
        raise URIError(
            f"option {head[0]!r} before the target in URI {text!r}: {scheme}: takes its "
            f"options after the target ({scheme}:TARGET,key=value)"
        )
    parts = list(_segments(rest))
    target = parts[0]
    if not target:
        raise URIError(f"empty target in URI {text!r}")
    return URI(scheme, target, _options(parts[1:], text), text)
