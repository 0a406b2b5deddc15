"""Low-level I/O: aligned buffers, pipe sizing, and fd-backed sources and sinks.

Sources on pipes, sockets and character devices are read non-blocking from the trio
event loop (``wait_readable``); regular files and block devices ignore O_NONBLOCK, so
they are read from worker threads. Sinks block (the pump calls them off any event loop).

trio is imported where it is first used, not here: a save helper never needs it, and
its import is the slowest the package makes (docs/performance.md) — time QEMU would
spend blocked on a full pipe.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import stat
import sys
from typing import TYPE_CHECKING, Final

from ._buffers import grow_pipe
from ._errors import Interrupted, TransportError, io_error
from ._transport import Sink, Source, ThreadedSource

if TYPE_CHECKING:
    from collections.abc import Callable

#: alignment for O_DIRECT buffers, lengths and offsets (covers 512 and 4096-byte sectors)
DIRECT_ALIGN: Final = 4096


def is_pollable(fd: int) -> bool:
    """True for fds where O_NONBLOCK works (pipes, sockets, ttys)."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)


class _NonBlocking:
    """Set O_NONBLOCK on an fd, and put the old flags back when done.

    O_NONBLOCK lives on the open file description, which our parent may share (a
    terminal), so it is restored on close.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved = fcntl.fcntl(fd, fcntl.F_GETFL)
        if not self._saved & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, self._saved | os.O_NONBLOCK)

    def restore(self) -> None:
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, self._saved)
        except OSError:
            pass


class FileSource(ThreadedSource):
    """Read a regular file or block device from its current position (threads)."""

    def __init__(self, fd: int, label: str, *, close: bool = True) -> None:
        self.fd = fd
        self.label = label
        self._close = close

    def read_blocking(self, buf: memoryview) -> int:
        try:
            return os.readv(self.fd, [buf])
        except OSError as exc:
            raise io_error(f"reading {self.label}", exc) from exc

    def close(self) -> None:
        if self._close and self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = -1


def fd_source(fd: int, label: str, *, close: bool = True) -> Source:
    """The right source for a descriptor: threads for files, the event loop otherwise."""
    if is_pollable(fd):
        return FdSource(fd, label, close=close)
    return FileSource(fd, label, close=close)


class FdSource(Source):
    """Read a pipe, socket or character device non-blocking on the trio event loop.

    ``label`` names the URI in errors. ``close`` says whether the fd is ours to close.
    """

    def __init__(self, fd: int, label: str, *, close: bool = True) -> None:
        self.fd = fd
        self.label = label
        self._close = close
        grow_pipe(fd)
        self._nb: _NonBlocking | None = _NonBlocking(fd)

    async def readinto(self, buf: memoryview) -> int:
        import trio

        try:
            while True:
                try:
                    return os.readv(self.fd, [buf])
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.fd)
        except OSError as exc:
            raise io_error(f"reading {self.label}", exc) from exc

    def _release(self) -> None:
        if self._nb is not None:
            self._nb.restore()
            self._nb = None
        if self._close and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    async def commit(self) -> None:
        self._release()

    async def abort(self) -> None:
        try:
            self._release()
        except OSError:
            pass


class NullSink(Sink):
    """Discards the stream (inspect, verify)."""

    def write(self, data: memoryview) -> None:
        pass

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


#: at commit, how long a pipe's reader may take none of the stream's last bytes (or a
#: socket's peer acknowledge none of them) before the save fails (see FdSink)
DRAIN_STALL = 30.0

#: SIOCOUTQ (linux/sockios.h): bytes a socket has sent that the peer has not yet taken
#: (AF_UNIX: not yet read; TCP: not yet acknowledged)
_SIOCOUTQ: Final = 0x5411


#: FIONREAD (asm-generic/ioctls.h): on a pipe, either end, the bytes not yet read
_FIONREAD: Final = 0x541B


def _queued(fd: int, request: int) -> int:
    """An ioctl that reports a count of bytes as an int (FIONREAD, SIOCOUTQ)."""
    return int.from_bytes(fcntl.ioctl(fd, request, bytes(4)), sys.byteorder)


class FdSink(Sink):
    """Blocking writes to an fd (from the pump's writer thread).

    A descriptor that arrives non-blocking (O_NONBLOCK is shared with whoever else has
    the open file description) is waited on with poll instead of failing with EAGAIN.
    Regular files are fdatasync'ed on commit (EINVAL/EROFS mean "cannot sync": ignored).
    Writes stay synchronous: a write-behind thread for pipes (QEMU's restore channel)
    measured no faster, and mostly slower (see docs/performance.md).

    With ``confirm`` (``fd:``), commit succeeds only once the consumer took the whole
    stream: on a pipe, once no byte is left unread in it (FIONREAD on the write end); a
    reader that closes its end with bytes unread fails the save. On a socket, the
    sending side is shut down (the peer sees the end of the stream) and commit waits
    until no byte is left unread by the peer (SIOCOUTQ; over TCP: unacknowledged); an
    error on the socket (the peer closed it with bytes unread: ECONNRESET) fails the
    save. Either wait fails after :attr:`stall` seconds (:data:`DRAIN_STALL`) in which
    the consumer took nothing, and ends (Interrupted) when :meth:`cancel` is called.
    Other descriptors (ttys, character devices) are not checked.

    ``lend``: lend pages to a pipe (vmsplice) when its reader is known to copy them
    (QEMU reads with readv); None finds out for an ``exec:`` helper's stdout.
    """

    def __init__(
        self,
        fd: int,
        label: str,
        *,
        close: bool = True,
        confirm: bool = False,
        lend: bool | None = None,
    ) -> None:
        self.fd = fd
        self.label = label
        self._close = close
        mode = os.fstat(fd).st_mode
        self._regular = stat.S_ISREG(mode)
        self._confirm = confirm and (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode))
        self._socket = stat.S_ISSOCK(mode)
        self._cancelled = False
        #: commit's wait for the consumer fails after this many seconds without progress
        self.stall: float | None = DRAIN_STALL
        self.started = False  # a write began (some of it may have gone out)
        self._splice: _PageLender | None = None
        if grow_pipe(fd) and (_read_by_qemu(fd) if lend is None else lend):
            self._splice = _PageLender()

    def write(self, data: memoryview) -> None:
        self.started = True
        try:
            if self._splice is not None:
                self._splice.write(self.fd, data)
            else:
                write_all(self.fd, data)
        except OSError as exc:
            raise io_error(f"writing {self.label}", exc) from exc

    def unread(self, done: Callable[[], bool] | None = None) -> int:
        """Wait until the reader of pipe :attr:`fd` took every byte written to it; return
        how many it left unread: 0, or what is left when the reader closed its end or
        ``done()`` became true (``exec:``: the command exited)."""
        poller = select.poll()
        poller.register(self.fd, 0)  # POLLERR (no reader left) is always reported

        def gone() -> bool:
            return bool(poller.poll(0)) or (done is not None and done())

        return self._wait_taken(lambda: _queued(self.fd, _FIONREAD), gone, "reader")

    def _socket_taken(self) -> None:
        """Shut the sending side down, then wait until the peer took every byte."""
        import socket

        sock = socket.socket(fileno=os.dup(self.fd))

        def left() -> int:
            n = _queued(self.fd, _SIOCOUTQ)
            # Checked after the count: a peer closing with bytes unread sets the error
            # before it drops them, which empties our count too.
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == errno.ECONNRESET:
                raise TransportError(
                    f"{self.label}: the peer closed the connection before it took the "
                    "whole stream"
                )
            if err:
                raise OSError(err, os.strerror(err))
            return n

        try:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    raise
            self._wait_taken(left, lambda: False, "peer")
        except OSError as exc:
            raise io_error(f"ending {self.label}", exc) from exc
        finally:
            sock.close()

    def _wait_taken(self, count: Callable[[], int], gone: Callable[[], bool], who: str) -> int:
        """Poll ``count()``, the bytes the consumer has yet to take, until it is 0 or
        ``gone()``; return the last count. Raises after :attr:`stall` seconds in which
        the count did not move, or once :meth:`cancel` was called."""
        import time

        delay, last, since = 0.001, -1, time.monotonic()
        while (left := count()) and not gone():
            if self._cancelled:
                raise Interrupted(f"{self.label}: cancelled")
            now = time.monotonic()
            if left != last:
                last, since, delay = left, now, 0.001
            elif self.stall is not None and now - since >= self.stall:
                raise TransportError(
                    f"{self.label}: the {who} stopped taking the stream before its end "
                    f"(nothing taken for {self.stall:g} s)"
                )
            time.sleep(delay)  # nothing to poll for: a pipe signals room, not emptiness
            delay = min(delay * 2, 0.05)
        return count() if left else 0

    def _release(self) -> None:
        if self._close and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def commit(self) -> None:
        if self._regular:
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EROFS):
                    raise io_error(f"syncing {self.label}", exc) from exc
        elif self._confirm and self._socket:
            self._socket_taken()
        elif self._confirm:
            try:
                left = self.unread()
            except OSError as exc:
                raise io_error(f"ending {self.label}", exc) from exc
            if left:
                raise TransportError(
                    f"{self.label}: the reader closed the pipe with {left} bytes of the "
                    "stream unread"
                )
        try:
            self._release()
        except OSError as exc:
            raise io_error(f"closing {self.label}", exc) from exc

    def cancel(self) -> None:
        self._cancelled = True  # ends a wait in commit (never a blocked write)

    def abort(self) -> None:
        try:
            self._release()
        except OSError:
            pass


#: how far up the process tree the QEMU of an ``exec:`` channel may be: ``sh -c``, then
#: wrappers such as ``/usr/bin/time`` or ``nice`` (dash forks for those, it does not exec)
_ANCESTORS: Final = 6


def _read_by_qemu(fd: int) -> bool:
    """True when pipe ``fd``'s read end is held by the QEMU that started this process
    (directly, or through ``/bin/sh -c`` and wrappers): an ``-incoming exec:`` channel,
    which QEMU reads with readv(2). A reader that copies is what makes lending pages
    safe; one that splice(2)s them on (to a socket, another pipe) could hold them after
    we reuse them, so any other consumer gets plain writes."""
    try:
        pipe = os.readlink(f"/proc/self/fd/{fd}")
        if not pipe.startswith("pipe:"):
            return False
        pid = os.getppid()
        for _ in range(_ANCESTORS):
            if pid <= 1:
                return False
            if os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("qemu-system-"):
                return any(_reads(pid, n, pipe) for n in os.listdir(f"/proc/{pid}/fd"))
            with open(f"/proc/{pid}/stat", "rb") as f:  # the parent: after "(comm) S"
                pid = int(f.read().rpartition(b")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return False


def _reads(pid: int, fd: str, pipe: str) -> bool:
    """Whether ``pid``'s descriptor ``fd`` is the read end of ``pipe``."""
    try:
        if os.readlink(f"/proc/{pid}/fd/{fd}") != pipe:
            return False
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"flags:"):
                    return int(line.split()[1], 8) & os.O_ACCMODE == os.O_RDONLY
    except (OSError, ValueError, IndexError):
        pass
    return False


class _PageLender:
    """Writes to a pipe by lending it our pages (vmsplice(2)) instead of copying them,
    all but the last pipe-full of each write, which is copied: once that copy is in,
    the pipe (FIFO, one page per slot) has released every page lent before it, so the
    caller may reuse its buffer when write() returns, as with a plain write."""

    def __init__(self) -> None:
        import ctypes

        self._ctypes = ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        self._vmsplice = libc.vmsplice
        self._vmsplice.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        self._vmsplice.restype = ctypes.c_ssize_t
        self._iov = (ctypes.c_size_t * 2)()

    def write(self, fd: int, data: memoryview) -> None:
        ctypes = self._ctypes
        lent = len(data) - fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        if lent > 0 and not data.readonly:
            anchor = ctypes.c_char.from_buffer(data)
            try:
                base, pos = ctypes.addressof(anchor), 0
                while pos < lent:
                    self._iov[0], self._iov[1] = base + pos, lent - pos
                    n = self._vmsplice(fd, self._iov, 1, 0)
                    if n < 0:
                        err = ctypes.get_errno()
                        if err == errno.EAGAIN:
                            select.select([], [fd], [])
                            continue
                        if err == errno.EINTR:
                            continue
                        raise OSError(err, os.strerror(err))
                    pos += n
            finally:
                del anchor
            data = data[lent:]
        write_all(fd, data)


def write_all(fd: int, data: memoryview) -> None:
    """Blocking write of all of ``data`` (for worker threads)."""
    while data:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        data = data[n:]


def drop_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to drop clean cached pages of a file range (best effort)."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
