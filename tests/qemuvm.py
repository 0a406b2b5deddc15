"""A small synchronous harness to run real QEMUs: start VMs, talk QMP, migrate.

Standard library only, so that tests and benchmark scripts can both use it::

    from qemuvm import VM, find_qemus, make_ram_file

    qemus = find_qemus()                      # {"7.2": "/usr/bin/...", "10.0": ".../qemu-...-10"}
    make_ram_file(tmp / "src.ram", 64)        # 64 MiB of random bytes
    with VM(qemus["7.2"], tmp, name="src", ram_file=tmp / "src.ram", paused=True) as vm:
        vm.migrate("exec:cat > /tmp/stream")
        info = vm.wait_migration(timeout=60)

Guest RAM is a ``memory-backend-file`` with ``share=on`` on a file the caller names, so a
test can fill the source's RAM before the start and compare the destination's RAM file
with it afterwards. Every wait has a timeout; when QEMU dies its log (stdout and stderr)
is part of the exception.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "MIB",
    "QMP",
    "VM",
    "QMPError",
    "VMError",
    "files_equal",
    "find_qemus",
    "first_difference",
    "kvm_usable",
    "make_ram_file",
    "qemu10_wrapper",
    "qemu_version",
]

MIB = 1 << 20
SYSTEM_QEMU = "/usr/bin/qemu-system-x86_64"
DEFAULT_CACHE = "/var/cache/vmtransport"
# QMP's max-bandwidth is in bytes per second on every QEMU (7.2 and 10.0 alike); HMP's
# migrate_set_parameter takes MiB/s by default instead. 100 GiB/s means "unlimited" here.
UNLIMITED_BANDWIDTH = 100 << 30
FINAL_MIGRATION_STATES = frozenset({"completed", "failed", "cancelled"})


# --------------------------------------------------------------------------------------
# Finding QEMUs


def cache_dir() -> Path:
    """Where scripts/setup.sh puts the unpacked QEMU 10.0 ($VMTRANSPORT_CACHE)."""
    return Path(os.environ.get("VMTRANSPORT_CACHE") or DEFAULT_CACHE)


def qemu10_wrapper() -> Path:
    return cache_dir() / "bin" / "qemu-system-x86_64-10"


def find_qemus() -> dict[str, str]:
    """Map "7.2" and "10.0" to the command that runs that QEMU, for those present."""
    candidates = {"7.2": SYSTEM_QEMU, "10.0": str(qemu10_wrapper())}
    return {
        version: cmd
        for version, cmd in candidates.items()
        if os.path.isfile(cmd) and os.access(cmd, os.X_OK)
    }


def qemu_version(cmd: str) -> str:
    """The version QEMU `cmd` reports, e.g. "7.2.22" or "10.0.2"."""
    out = subprocess.run(
        [cmd, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    if m is None:
        raise ValueError(f"cannot parse the version of {cmd}: {out!r}")
    return m.group(1)


def kvm_usable() -> bool:
    """True when /dev/kvm can be opened read-write (QEMU then gets accel=kvm)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


# --------------------------------------------------------------------------------------
# QMP


class QMPError(Exception):
    """An error reply to a QMP command."""

    def __init__(self, desc: str, error_class: str = "GenericError", command: str = "") -> None:
        super().__init__(f"{command}: {desc}" if command else desc)
        self.desc = desc
        self.error_class = error_class
        self.command = command


class VMError(Exception):
    """QEMU misbehaved: died, did not start, or a wait timed out. Carries QEMU's log."""


class QMP:
    """Synchronous QMP client on a unix socket.

    Events that arrive while waiting for replies are kept in ``events`` (oldest first);
    ``wait_event`` takes them out of that list.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0

    # -- connection
    def connect(
        self, timeout: float | None = None, alive: Callable[[], bool] | None = None
    ) -> dict[str, Any]:
        """Connect (retrying until the socket exists and listens), read the greeting and
        negotiate capabilities. ``alive``, if given, is a callable returning False once
        the server is known to be gone: then connecting stops early."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if alive is not None and not alive():
                    raise ConnectionError(f"QMP server gone before {self.path} opened") from e
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"QMP socket {self.path} did not open in time") from e
                time.sleep(0.02)
        self._sock = sock
        self._buf = b""
        try:
            greeting = self._read_message(deadline)
            if "QMP" not in greeting:
                raise QMPError(f"unexpected QMP greeting {greeting!r}")
            self.greeting = greeting
            self.cmd("qmp_capabilities", timeout=max(deadline - time.monotonic(), 1.0))
        except BaseException:
            self.close()
            raise
        return greeting

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # -- low level
    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionError("QMP not connected")
        return self._sock

    def _read_message(self, deadline: float) -> dict[str, Any]:
        sock = self._socket()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for QMP")
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("timed out waiting for QMP") from None
            if not data:
                raise ConnectionError("QMP connection closed by QEMU")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise QMPError(f"unexpected QMP message {msg!r}")
        return msg

    def _send(self, payload: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = json.dumps(payload).encode() + b"\n"
        sock = self._socket()
        sock.settimeout(self.timeout)
        if fds:
            # One sendmsg: the fds travel with the first byte(s) of the command.
            sent = socket.send_fds(sock, [data], list(fds))
            data = data[sent:]
        if data:
            sock.sendall(data)

    # -- commands and events
    def cmd(
        self,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        fds: Sequence[int] = (),
        **kwargs: Any,
    ) -> Any:
        """Run QMP command ``name`` and return its ``return`` value.

        Arguments come from ``args`` (exact QMP names) and from keyword arguments, whose
        underscores become dashes (``max_bandwidth=`` is ``max-bandwidth``). Raises
        QMPError on an error reply.
        """
        arguments = dict(args or {})
        arguments.update({k.replace("_", "-"): v for k, v in kwargs.items()})
        self._next_id += 1
        cmd_id = f"vmt-{self._next_id}"
        payload: dict[str, Any] = {"execute": name, "id": cmd_id}
        if arguments:
            payload["arguments"] = arguments
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._send(payload, fds)
        while True:
            msg = self._read_message(deadline)
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != cmd_id:
                continue  # a late reply to an earlier command that timed out
            if "error" in msg:
                err = msg["error"]
                raise QMPError(
                    str(err.get("desc", err)), str(err.get("class", "GenericError")), name
                )
            return msg.get("return")

    def send_fd(self, fd: int, fdname: str) -> None:
        """Pass ``fd`` to QEMU (SCM_RIGHTS) under ``fdname`` (QMP ``getfd``)."""
        self.cmd("getfd", {"fdname": fdname}, fds=[fd])

    def take_event(
        self, name: str, match: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Remove and return the oldest collected event ``name`` whose data contains
        ``match`` (a subset), or None."""
        for i, ev in enumerate(self.events):
            if ev.get("event") != name:
                continue
            data = ev.get("data", {})
            if match and any(data.get(k) != v for k, v in match.items()):
                continue
            return self.events.pop(i)
        return None

    def wait_event(
        self, name: str, timeout: float = 30.0, match: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Wait for event ``name`` (already collected or new); see ``take_event``."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.take_event(name, match)
            if ev is not None:
                return ev
            try:
                msg = self._read_message(deadline)
            except TimeoutError:
                raise TimeoutError(f"no QMP event {name} {match or ''} in {timeout}s") from None
            if "event" in msg:
                self.events.append(msg)


# --------------------------------------------------------------------------------------
# VMs


class VM:
    """One QEMU process (x86 ``pc`` machine, no devices, RAM in a shared file).

    The command line is::

        QEMU -nodefaults -display none -machine pc,accel=kvm|tcg,memory-backend=mem
             -object memory-backend-file,id=mem,size=NM,mem-path=RAM_FILE,share=on -m NM
             -qmp unix:SOCK,server=on,wait=off [-S] [EXTRA_ARGS...] [-incoming URI]

    ``ram_file`` defaults to ``WORKDIR/NAME.ram``, created zero-filled (sparse) when it
    does not exist. QEMU's stdout and stderr go to ``WORKDIR/NAME.log``. Use as a context
    manager, or call ``start()`` and ``close()``.
    """

    def __init__(
        self,
        qemu: str | Sequence[str],
        workdir: str | os.PathLike[str],
        *,
        name: str = "vm",
        mem_mib: int = 64,
        ram_file: str | os.PathLike[str] | None = None,
        paused: bool = False,
        incoming: str | None = None,
        extra_args: Sequence[str] = (),
        accel: str | None = None,
        machine: str = "pc",
        start_timeout: float = 30.0,
        qmp_timeout: float = 30.0,
    ) -> None:
        self.qemu = [qemu] if isinstance(qemu, str) else list(qemu)
        self.workdir = Path(workdir)
        self.name = name
        self.mem_mib = mem_mib
        self.ram_file = Path(ram_file) if ram_file is not None else self.workdir / f"{name}.ram"
        self.paused = paused
        self.incoming = incoming
        self.extra_args = list(extra_args)
        self.accel = accel or ("kvm" if kvm_usable() else "tcg")
        self.machine = machine
        self.start_timeout = start_timeout
        self.log_path = self.workdir / f"{name}.log"
        # Unix socket paths are limited to 107 bytes: keep them short, outside workdir.
        self._sockdir = ""
        self.qmp_path = ""
        self.qmp = QMP("", timeout=qmp_timeout)
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle
    def args(self) -> list[str]:
        mem = f"{self.mem_mib}M"
        args = [
            *self.qemu,
            "-nodefaults",
            "-display", "none",
            "-machine", f"{self.machine},accel={self.accel},memory-backend=mem",
            "-object",
            f"memory-backend-file,id=mem,size={mem},mem-path={self.ram_file},share=on",
            "-m", mem,
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        if self.paused:
            args.append("-S")
        args += self.extra_args
        if self.incoming is not None:
            args += ["-incoming", self.incoming]
        return args

    def start(self) -> Self:
        if self._proc is not None:
            raise VMError(f"{self.name}: already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.ram_file.exists():
            make_ram_file(self.ram_file, self.mem_mib, random=False)
        self._sockdir = tempfile.mkdtemp(prefix="vmtqmp-")
        self.qmp_path = os.path.join(self._sockdir, "qmp.sock")
        self.qmp.path = self.qmp_path
        args = self.args()
        with open(self.log_path, "ab") as log:
            log.write(("+ " + " ".join(args) + "\n").encode())
            log.flush()
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self.qmp.connect(timeout=self.start_timeout, alive=lambda: self.returncode is None)
        except (OSError, QMPError, ValueError) as e:
            # QEMU usually died (bad option, missing firmware...): show why.
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            raise self._error(f"did not start ({e})") from e
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Ask QEMU to quit; kill it if it has not gone after ``timeout`` seconds."""
        proc = self._proc
        try:
            if proc is not None and proc.poll() is None:
                if self.qmp.connected:
                    try:
                        self.qmp.cmd("quit", timeout=timeout)
                    except (OSError, QMPError):
                        pass  # it may close the socket before replying
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            self.qmp.close()
            if self._sockdir:
                shutil.rmtree(self._sockdir, ignore_errors=True)
                self._sockdir = ""

    def kill(self) -> None:
        """SIGKILL QEMU and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise VMError(f"{self.name}: not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, None while it runs (or before start)."""
        return None if self._proc is None else self._proc.poll()

    def wait_exit(self, timeout: float) -> int:
        if self._proc is None:
            raise VMError(f"{self.name}: not started")
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self._error(f"still running after {timeout}s") from None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _error(self, what: str) -> VMError:
        rc = self.returncode
        state = "running" if rc is None else f"exit status {rc}"
        return VMError(f"QEMU {self.name} ({state}) {what}\n--- {self.log_path} ---\n{self.log()}")

    def _check_alive(self, what: str) -> None:
        if self.returncode is not None:
            raise self._error(f"died while {what}")

    # -- queries
    def cmd(self, name: str, args: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """``qmp.cmd`` with QEMU's log in the exception if QEMU is gone."""
        try:
            return self.qmp.cmd(name, args, **kwargs)
        except (OSError, ValueError) as e:
            # Most likely QEMU is exiting: give it a moment so the error shows its status.
            self._proc_wait_briefly()
            raise self._error(f"failed QMP {name}: {e}") from e

    def status(self) -> str:
        """The run state: prelaunch, running, paused, inmigrate, postmigrate, ..."""
        return str(self.cmd("query-status")["status"])

    def query_migrate(self) -> dict[str, Any]:
        result = self.cmd("query-migrate")
        return dict(result)

    # -- migration
    def migrate(
        self,
        uri: str,
        max_bandwidth: int = UNLIMITED_BANDWIDTH,
        capabilities: Mapping[str, bool] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        """Start an outgoing migration to ``uri`` (asynchronous; see wait_migration).

        Raises the bandwidth limit (bytes/s; QEMU's default is 128 MiB/s), enables the
        ``events`` capability (MIGRATION events) plus ``capabilities``, sets
        ``parameters``."""
        caps = {"events": True, **(capabilities or {})}
        self.cmd(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
        )
        self.cmd("migrate-set-parameters", {"max-bandwidth": max_bandwidth, **(parameters or {})})
        self.cmd("migrate", {"uri": uri})

    def wait_migration(self, timeout: float = 120.0, poll: float = 0.05) -> dict[str, Any]:
        """Poll query-migrate until completed, failed or cancelled; return that result.
        On timeout raises VMError with the last result and QEMU's log.

        QEMU reports "completed" before its cleanup bottom half moves the run state from
        finish-migrate on (to postmigrate, or back after a failure): wait for that too, so
        callers see the final run state."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("migrating")
            info = self.query_migrate()
            if info.get("status") in FINAL_MIGRATION_STATES:
                while self.status() == "finish-migrate" and time.monotonic() < deadline:
                    time.sleep(0.01)
                return info
            if time.monotonic() >= deadline:
                raise self._error(f"migration not finished after {timeout}s: {info}")
            time.sleep(poll)

    def wait_incoming(self, timeout: float = 120.0, poll: float = 0.05) -> str:
        """On a destination started with ``incoming``: wait until it has left the
        ``inmigrate`` state and return the new run state. A failed load makes QEMU exit:
        that raises VMError with its exit status and log."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("receiving the migration")
            status = self.status()
            if status != "inmigrate":
                return status
            if time.monotonic() >= deadline:
                raise self._error(f"still inmigrate after {timeout}s")
            time.sleep(poll)

    def _proc_wait_briefly(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass


# --------------------------------------------------------------------------------------
# RAM files

_SEED_BYTES = 16 * MIB
_CHUNK_BYTES = 16 * MIB


def make_ram_file(path: str | os.PathLike[str], size_mib: int, random: bool = True) -> None:
    """Create ``path`` with ``size_mib`` MiB: random bytes, or zeros (sparse).

    Random content is made fast: 16 MiB from os.urandom (which runs at only ~160 MB/s
    here), then every 16 MiB chunk is that seed rotated by a different, non-page-aligned
    amount, so no two 4 KiB pages are equal (for files up to 64 GiB)."""
    size = size_mib * MIB
    with open(path, "wb") as f:
        if not random:
            f.truncate(size)
            return
        seed = memoryview(os.urandom(min(_SEED_BYTES, size)))
        n = len(seed)
        written = 0
        chunk = 0
        while written < size:
            k = (chunk * 4097) % n
            for piece in (seed[k:], seed[:k]):
                piece = piece[: size - written]
                f.write(piece)
                written += len(piece)
            chunk += 1


def first_difference(
    a: str | os.PathLike[str], b: str | os.PathLike[str], chunk: int = 8 * MIB
) -> int | None:
    """Offset of the first byte where files ``a`` and ``b`` differ (the shorter one's
    size when one is a prefix of the other), or None when they are equal."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            da = fa.read(chunk)
            db = fb.read(chunk)
            if da != db:
                n = min(len(da), len(db))
                for i in range(0, n, 4096):
                    end = min(i + 4096, n)
                    if da[i:end] != db[i:end]:
                        return offset + next(j for j in range(i, end) if da[j] != db[j])
                return offset + n
            if not da:
                return None
            offset += len(da)


def files_equal(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    return first_difference(a, b) is None


def describe_difference(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> str:
    """A message for assertions: where and how ``a`` and ``b`` differ."""
    off = first_difference(a, b)
    if off is None:
        return f"{a} and {b} are equal"
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    return (
        f"{a} ({sa} bytes) and {b} ({sb} bytes) differ first at offset {off:#x} "
        f"(page {off // 4096})"
    )
