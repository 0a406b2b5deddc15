"""The transport contract: what a URI scheme provides, and the two stream ends.

A transport turns a parsed URI into a *sink* (save direction: QEMU's outgoing stream is
written into it) or a *source* (restore direction: the stream is read from it).

Blocking rules (docs/semantics.md): sinks block and are driven from a pipeline's writer
thread, never from an event loop; sources are async and never block the trio event loop
(or are :class:`ThreadedSource`, read from threads).

What a sink is handed is documented on :meth:`Sink.write`; ``tests`` drive every
built-in path through a sink that enforces it.
"""

from __future__ import annotations

import abc
from _thread import get_ident
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, ClassVar

from ._errors import URIError
from ._uri import URI, parse_uri

if TYPE_CHECKING:
    from ._registry import Registry


class Sink(abc.ABC):
    """Where a stream goes (save direction). Exactly one of commit or abort ends it.

    ``write``, ``commit``, ``abort`` and ``enable_write_behind`` are called from one
    thread, the pipeline's writer thread, never from an event loop: they may block
    (QEMU's outgoing channels are blocking too: its migration runs in a thread). Only
    :meth:`cancel` comes from another thread.
    """

    @abc.abstractmethod
    def write(self, data: memoryview) -> None:
        """Write all of ``data``, a non-empty byte view.

        ``data`` may be read-only and is the caller's again when ``write`` returns
        (unless write-behind is on): copy what you keep. Alignment is a property of
        the path, not a promise: a save passes the pipeline's own buffers unchanged —
        page aligned, whole 4 KiB blocks, only the stream's last write shorter; a
        restore or copy strips an image's or a libvirt header and holds back the
        stream's end until it is proven, so its views start and end anywhere.
        A sink that needs alignment (O_DIRECT) uses aligned data as it is and stages
        the rest (see ``odirect:``).
        """

    def enable_write_behind(self) -> int:
        """Let ``write`` return while its data is still being written; return how many
        of the latest buffers it may still be reading when ``write`` returns (0: none,
        the default). The caller then changes no buffer before that many further writes
        returned, or commit or abort did. Pipelines call this once, before the first
        write, for buffers they own; a wrapping sink passes the request on only when
        it hands ``data`` on unchanged."""
        return 0

    @abc.abstractmethod
    def commit(self) -> None:
        """The stream is complete: make it durable and visible under its final name.
        Return only once the whole stream reached its target: a consumer (a command,
        a pipe's reader, a socket's peer, an inner sink) that may have stopped short
        of the end must be found to have taken every byte, and commit raises if it did
        not or cannot be told (``exec:`` waits for its command to read the pipe empty
        and exit 0; ``fd:`` on a pipe or socket waits until nothing is left unread).
        If it raises, nothing may be visible under that name; abort follows (so it
        must be safe after a failed commit). It may block; :meth:`cancel` ends such a
        wait."""

    @abc.abstractmethod
    def abort(self) -> None:
        """The stream failed: undo (remove temporaries, stop children). Never raises.
        Called after the last write returned: descriptors may be closed here."""

    def cancel(self) -> None:
        """The run is being cancelled, possibly while a ``write`` or ``commit`` is
        blocked in the writer thread (this call comes from another thread). Make such
        a write return soon if the transport can (``exec:`` stops its command) and make
        sure nothing becomes visible under the final name, but close no descriptor a
        blocked write may be using: ``abort`` follows from the writer thread. Never
        raises. The default does nothing."""
        return None


class SeekableSink(Sink):
    """A sink on a file: it can rewrite bytes it wrote before (an image's header).

    ``rewrite`` is always given a page-aligned buffer whose length is a multiple of
    4096, at a 4096-aligned stream offset, so O_DIRECT sinks can use it as it is.
    """

    #: False when this particular target cannot seek after all (a FIFO written in place)
    rewritable: bool = True

    @abc.abstractmethod
    def rewrite(self, offset: int, data: memoryview) -> None:
        """Overwrite the stream's bytes at ``offset`` (relative to the stream's start)."""


class Source(abc.ABC):
    """Where a stream comes from (restore direction). Exactly one of commit or abort ends it.

    Methods are async and never block the trio event loop: pipes and sockets are read
    non-blocking, regular files from worker threads. QEMU's incoming side works the same
    way (its load runs in a coroutine on the main loop).
    """

    @abc.abstractmethod
    async def readinto(self, buf: memoryview) -> int:
        """Read up to ``len(buf)`` bytes into ``buf``; 0 if and only if end of stream.

        ``buf`` is a writable, non-empty view of one of the pipeline's buffers, from
        where the previous read into it ended: page aligned, with a length that is a
        multiple of 4 KiB, while every read so far returned whole blocks. Called from
        one trio task at a time."""

    @abc.abstractmethod
    async def commit(self) -> None:
        """End of stream reached; raise if the producer reports failure (exit status)."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Reading stopped early: release resources. Never raises."""


class ThreadedSource(Source):
    """A source whose reads block: regular files and block devices.

    Async callers get its reads through worker threads. A caller with no event loop
    (``vmtransport restore``) calls :meth:`read_blocking` and :meth:`close` directly and
    never imports trio, whose import would hold QEMU up (docs/performance.md).
    """

    @abc.abstractmethod
    def read_blocking(self, buf: memoryview) -> int:
        """Blocking read of up to ``len(buf)`` bytes; 0 if and only if end of stream.
        Called from one reader thread (``buf`` as for :meth:`Source.readinto`)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the source. Never raises."""

    def parallel_reads(self) -> tuple[Callable[[memoryview, int], int], int, int] | None:
        """``(pread, start, end)`` when the bytes ``start:end`` may be read in any order,
        several at once, with ``pread(buf, pos)`` (a file of known size: the pump then
        keeps a few reads in flight); None to be read in order with
        :meth:`read_blocking`."""
        return None

    async def readinto(self, buf: memoryview) -> int:
        import trio

        return await trio.to_thread.run_sync(self.read_blocking, buf)

    async def commit(self) -> None:
        self.close()

    async def abort(self) -> None:
        self.close()


#: thread id -> the registry whose ``resolve`` is constructing a transport in it (see
#: Transport.registry). resolve never awaits, so per thread is per context: importing
#: contextvars would cost the save helper start-up time.
_resolving: dict[int, Registry] = {}

#: one more than the largest file offset (off_t is signed 64-bit)
_OFF_MAX = 1 << 63


class Transport(abc.ABC):
    """One URI scheme. Subclasses set :attr:`scheme` and :attr:`options`.

    Constructing a transport validates the URI (no I/O); opening does the I/O.

    :attr:`registry` is the :class:`~vmtransport.Registry` whose ``resolve`` built the
    transport (the process one, :func:`~vmtransport.get_registry`, for a transport
    constructed directly). A transport wrapping another (``zstd:odirect:/x.sav``)
    derives from :class:`WrappingTransport`, which resolves the inner URI through it.
    """

    scheme: ClassVar[str]
    #: one-line description for ``vmtransport plugins``
    summary: ClassVar[str] = ""
    #: option name -> help text; anything else is refused
    options: ClassVar[Mapping[str, str]] = {}
    #: the target is taken verbatim (a command line, an inner URI): options, if any, are
    #: written after the scheme (``SCHEME,key=value:TARGET``)
    raw_target: ClassVar[bool] = False
    #: what a save writes: "image" (vmtransport image; needs a SeekableSink) or "raw"
    save_format: str = "raw"
    _registry: Registry | None = None

    def __init__(self, uri: URI) -> None:
        if uri.scheme != self.scheme:
            raise URIError(f"{uri}: transport {self.scheme!r} cannot handle {uri.scheme!r}")
        for key in uri.options:
            if key not in self.options:
                known = ", ".join(sorted(self.options)) or "none"
                raise URIError(f"unknown option {key!r} in URI {str(uri)!r} (known: {known})")
        self.uri = uri
        self._registry = _resolving.get(get_ident())

    @property
    def registry(self) -> Registry:
        """The registry that resolved this transport's URI."""
        if self._registry is None:
            from ._registry import get_registry

            self._registry = get_registry()
        return self._registry

    @classmethod
    def parse(cls, text: str) -> URI:
        return parse_uri(text, raw=cls.raw_target)

    def int_option(self, name: str, default: int, *, multiple_of: int = 1) -> int:
        raw = self.uri.options.get(name)
        if raw is None:
            return default
        try:
            value = int(raw, 0)
        except ValueError:
            value = -1
        if value < 0:
            raise URIError(
                f"option {name}={raw!r} in URI {str(self.uri)!r}: expected a non-negative integer"
            )
        if value >= _OFF_MAX:  # the kernel's off_t: lseek/ftruncate would overflow
            raise URIError(
                f"option {name}={raw!r} in URI {str(self.uri)!r}: out of range (at most "
                f"{_OFF_MAX - 1})"
            )
        if value % multiple_of:
            raise URIError(
                f"option {name}={raw!r} in URI {str(self.uri)!r}: must be a multiple of "
                f"{multiple_of}"
            )
        return value

    def choice_option(self, name: str, choices: tuple[str, ...]) -> str:
        """The option's value, or the first choice (the default) when absent."""
        raw = self.uri.options.get(name, choices[0])
        if raw not in choices:
            raise URIError(
                f"option {name}={raw!r} in URI {str(self.uri)!r}: expected one of "
                f"{', '.join(choices)}"
            )
        return raw

    @abc.abstractmethod
    def open_sink(self) -> Sink:
        """Open for writing a stream (save direction). May block: call from a thread."""

    @abc.abstractmethod
    async def open_source(self) -> Source:
        """Open for reading a stream (restore direction)."""

    def open_threaded_source(self) -> ThreadedSource | None:
        """The source as blocking reads for a caller without an event loop, or None when
        it needs one (pipes, sockets). Transports on files override this."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uri}>"


#: thread id -> how many wrapping transports are being constructed in it
_nesting: dict[int, int] = {}
#: the deepest nesting of wrapping transports (``a:b:c:...``) a URI may have
MAX_NESTING = 8


class WrappingTransport(Transport):
    """A transport over another one: ``SCHEME[,key=value...]:INNER-URI``.

    The target is the inner URI, verbatim, as it would be written alone (its own
    ``,key=value`` options and ``,,`` escapes included); the wrapper's options go after
    its scheme: ``zstd,level=9:odirect:/x.sav,fallback=error``. The inner URI is
    resolved in ``__init__`` through the same :attr:`registry` (any scheme, plugins
    included, wrappers too), so a bad inner URI fails the outer one's construction.

    :attr:`save_format` is the inner transport's (an image where the inner target can
    hold one); a wrapper whose sink cannot rewrite sets it to ``"raw"``.
    """

    raw_target: ClassVar[bool] = True
    #: the transport of the inner URI
    inner: Transport

    def __init__(self, uri: URI) -> None:
        super().__init__(uri)
        thread = get_ident()
        depth = _nesting.get(thread, 0)
        if depth >= MAX_NESTING:
            raise URIError(f"URI {str(uri)!r} nests more than {MAX_NESTING} transports")
        _nesting[thread] = depth + 1
        try:
            self.inner = self.registry.resolve(uri.target)
        except URIError as exc:
            if depth:  # the outermost wrapper names the whole URI, once
                raise
            raise URIError(f"{exc}, inside URI {str(uri)!r}") from exc
        finally:
            if depth:
                _nesting[thread] = depth
            else:
                del _nesting[thread]
        self.save_format = self.inner.save_format
