"""Tiny stand-ins for "the other end of the pipe", run with ``python -S -I``.

    discard            read stdin to EOF and drop it, with the pipe grown to 1 MiB
                       (the producer's limit: nothing slower than QEMU itself)
    serve FILE         write FILE to stdout with splice(2), the pipe grown to 1 MiB
                       (the consumer's limit when FILE is on tmpfs)
    odirect-exec r|w PATH PROG [ARGS...]
                       open PATH with O_DIRECT (w: O_WRONLY|O_CREAT|O_TRUNC, r: O_RDONLY),
                       put the fd number where ARGS says {fd}, exec PROG — how libvirt
                       runs libvirt_iohelper for `virsh save/restore --bypass-cache`

Standard library only and minimal imports: start-up time counts against the contender.
"""

import fcntl
import os
import sys

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
    elif cmd == "odirect-exec":
        odirect_exec(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        sys.exit(f"limits.py: unknown command {cmd!r}")
