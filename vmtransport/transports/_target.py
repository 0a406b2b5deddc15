"""Write a path atomically: a 0600 temporary beside it, renamed over it on commit only."""

from __future__ import annotations

import errno
import os
import stat
import threading

from .._errors import TransportError, io_error
from .._io import drop_cache


class AtomicTarget:
    """The file a save writes to.

    Regular files (and paths that do not exist yet) are written to a temporary created
    exclusively beside them (O_EXCL|O_NOFOLLOW, mode 0600) and renamed over the final
    name on success only; devices and FIFOs are written in place. With ``offset`` the
    first ``offset`` bytes of an existing file are carried over into the temporary (zeros
    when the file does not exist), as QEMU's ``file:PATH,offset=N`` leaves them alone.
    """

    def __init__(self, path: str, offset: int, label: str) -> None:
        self.path = os.path.abspath(path)
        self.parent = os.path.dirname(self.path)
        self.offset = offset
        self.label = label
        self.tmp: str | None = None  # the temporary's name, while it has one
        self.in_place: bool | None = None  # devices and FIFOs are written in place
        self.rewritable = True  # can pwrite what it wrote before (an image header)
        self.fd = -1
        self._cancelled = False
        self._naming = threading.Lock()  # cancel() against commit's naming steps

    def open(self) -> int:
        parent = self.parent
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise io_error(f"{self.label}", exc) from exc
        if st is not None and (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                               or stat.S_ISFIFO(st.st_mode)):
            self.in_place = True
            self.rewritable = stat.S_ISBLK(st.st_mode)  # not FIFOs, not character devices
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                if self.offset and not stat.S_ISFIFO(st.st_mode):
                    os.lseek(self.fd, self.offset, os.SEEK_SET)
            except OSError as exc:
                raise io_error(f"opening {self.label}", exc) from exc
            return self.fd
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise TransportError(f"cannot save to {self.label}: {self.path} is a directory")
        if not os.path.isdir(parent):
            raise TransportError(
                f"cannot save to {self.label}: directory {parent} does not exist"
            )
        self.fd = self._create(parent)
        self.in_place = False
        try:
            if self.offset:
                self._carry_prefix(st is not None and stat.S_ISREG(st.st_mode))
        except OSError as exc:
            self.abort()
            raise io_error(f"preparing {self.label}", exc) from exc
        except BaseException:
            self.abort()
            raise
        return self.fd

    def _create(self, parent: str) -> int:
        # An unnamed O_TMPFILE leaves nothing behind even if we are SIGKILLed; where the
        # filesystem lacks it, a named temporary created exclusively.
        try:
            return os.open(parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise io_error(f"creating a temporary file for {self.label}", exc) from exc
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(100):
            tmp = self._tmp_name(parent)
            try:
                fd = os.open(tmp, flags, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise io_error(f"creating a temporary file for {self.label}", exc) from exc
            self.tmp = tmp
            return fd
        raise TransportError(f"cannot create a temporary file beside {self.path}")

    def _tmp_name(self, parent: str) -> str:
        name = f".{os.path.basename(self.path)}.{os.urandom(4).hex()}.vmtransport-tmp"
        return os.path.join(parent, name)

    def _carry_prefix(self, exists: bool) -> None:
        os.ftruncate(self.fd, self.offset)
        if exists:
            src = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                remaining, pos = self.offset, 0
                while remaining:
                    chunk = os.pread(src, min(remaining, 1 << 20), pos)
                    if not chunk:
                        break  # shorter file: the rest stays zero, like QEMU's truncate
                    os.pwrite(self.fd, chunk, pos)
                    pos += len(chunk)
                    remaining -= len(chunk)
            finally:
                os.close(src)
        os.fdatasync(self.fd)
        drop_cache(self.fd, 0, self.offset)
        os.lseek(self.fd, self.offset, os.SEEK_SET)

    def rewrite(self, offset: int, data: memoryview) -> None:
        """pwrite at a stream offset (after ``offset=N``'s prefix)."""
        pos = self.offset + offset
        try:
            while data:
                n = os.pwrite(self.fd, data, pos)
                data = data[n:]
                pos += n
        except OSError as exc:
            raise io_error(f"writing {self.label}", exc) from exc

    def commit(self, length: int) -> None:
        """Sync, close and (for temporaries) rename; ``length`` is the stream's length."""
        try:
            if self.in_place is False:
                os.ftruncate(self.fd, self.offset + length)
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EROFS):
                    raise
            with self._naming:  # a cancel() from now on comes too late
                if self._cancelled:
                    raise OSError(errno.ECANCELED, "cancelled")
                if self.in_place is False and self.tmp is None:
                    self._link_anonymous()
                os.close(self.fd)
                self.fd = -1
                if self.tmp is not None:
                    os.rename(self.tmp, self.path)
                    self.tmp = None
                dfd = os.open(self.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            self.abort()
            raise io_error(f"committing {self.label}", exc) from exc

    def _link_anonymous(self) -> None:
        """Give the O_TMPFILE a (temporary) name; rename then puts it in place atomically."""
        # A src_dir_fd makes Python use linkat(AT_SYMLINK_FOLLOW); plain link() would try
        # to link the /proc magic symlink itself (EXDEV).
        procfd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for _ in range(100):
                tmp = self._tmp_name(self.parent)
                try:
                    os.link(str(self.fd), tmp, src_dir_fd=procfd, follow_symlinks=True)
                except FileExistsError:
                    continue
                self.tmp = tmp
                return
        finally:
            os.close(procfd)
        raise TransportError(f"cannot name the temporary file beside {self.path}")

    def cancel(self) -> None:
        """From another thread, maybe while a write or commit runs: the temporary will
        never be renamed into place, and loses its name now (the descriptor stays open
        for the writer, who aborts). Never raises."""
        with self._naming:
            self._cancelled = True
            if self.tmp is not None and self.fd >= 0:
                try:
                    os.unlink(self.tmp)
                except OSError:
                    pass
                self.tmp = None

    def abort(self, *, close: bool = True) -> None:
        """Remove the temporary; the final name is untouched. Never raises. With
        ``close=False`` the descriptor is left open (a write to it may still hang)."""
        if close and self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None
