"""Tiny stand-ins for "the other end of the pipe", run with ``python -S -I``.

    discard            read stdin to EOF and drop it, with the pipe grown to 1 MiB
                       (the producer's limit: nothing slower than QEMU itself)
    serve FILE         write FILE to stdout with splice(2), the pipe grown to 1 MiB
                       (the consumer's limit when FILE is on tmpfs)
    disk-write PATH BYTES
                       write BYTES to a new file with O_DIRECT, 8 MiB at a time, two
                       writes in flight, then fdatasync: the disk alone, no QEMU
    disk-read PATH     read PATH with O_DIRECT, 8 MiB at a time, three reads in flight
    odirect-exec r|w PATH PROG [ARGS...]
                       open PATH with O_DIRECT (w: O_WRONLY|O_CREAT|O_TRUNC, r: O_RDONLY),
                       put the fd number where ARGS says {fd}, exec PROG — how libvirt
                       runs libvirt_iohelper for `virsh save/restore --bypass-cache`

Standard library only and minimal imports: start-up time counts against the contender.
"""

import fcntl
import os
import sys

TYPE_CHECKING = False  # typing's import would count against the contender's start-up
if TYPE_CHECKING:
    from collections.abc import Callable

PIPE = 1 << 20


def grow(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE)
    except OSError:
        pass


def discard() -> None:
    grow(0)
    buf = bytearray(PIPE)
    view = memoryview(buf)
    while os.readv(0, [view]):
        pass


def serve(path: str) -> None:
    grow(1)
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    off = 0
    while off < size:
        n = os.splice(fd, 1, size - off, offset_src=off)
        if n == 0:
            break
        off += n


CHUNK = 8 << 20


def _in_flight(
    fd: int, size: int, depth: int, io: "Callable[[int, memoryview, int], object]"
) -> None:
    """``depth`` threads, each taking the next 8 MiB chunk of ``size`` bytes in turn."""
    import mmap
    import threading

    pattern = os.urandom(1 << 20) * (CHUNK >> 20)  # not zeros: a disk may skip those
    lock = threading.Lock()
    nxt = [0]

    def run() -> None:
        buf = mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)  # contiguous memory: fewer, larger disk requests
        buf.write(pattern)
        view = memoryview(buf)
        while True:
            with lock:
                pos = nxt[0]
                nxt[0] += CHUNK
            if pos >= size:
                return
            io(fd, view[: min(CHUNK, size - pos)], pos)

    threads = [threading.Thread(target=run) for _ in range(depth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def disk_write(path: str, size: int) -> None:
    size = -(-size // 4096) * 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    _in_flight(fd, size, 2, os.pwrite)
    os.fdatasync(fd)


def disk_read(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    size = -(-os.fstat(fd).st_size // 4096) * 4096
    _in_flight(fd, size, 3, _pread)


def _pread(fd: int, view: memoryview, pos: int) -> None:
    os.preadv(fd, [view], pos)


def odirect_exec(mode: str, path: str, prog: str, args: list[str]) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC if mode == "w" else os.O_RDONLY
    fd = os.open(path, flags | os.O_DIRECT, 0o600)
    os.set_inheritable(fd, True)
    os.execv(prog, [prog, *(a.replace("{fd}", str(fd)) for a in args)])


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "discard":
        discard()
    elif cmd == "serve":
        serve(sys.argv[2])
    elif cmd == "disk-write":
        disk_write(sys.argv[2], int(sys.argv[3]))
    elif cmd == "disk-read":
        disk_read(sys.argv[2])
    elif cmd == "odirect-exec":
        odirect_exec(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        sys.exit(f"limits.py: unknown command {cmd!r}")
