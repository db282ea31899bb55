"""The service helper: for each service URL, use the server that answers or start a private one.

Standard library plus psycopg only: it runs before Django settings exist (make demo, make test).

CLI::

    python -m devtools.services up | down | status
    python -m devtools.services run -- CMD ARGS...
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import SplitResult, urlsplit, urlunsplit

from argus.environment import DEFAULT_SERVICE_URLS, read_dotenv
from devtools.services import mosquitto, nats, postgres, redis
from devtools.services.base import (
    LOCAL_HOSTS,
    PID_FILE_NAME,
    STOP_TIMEOUT,
    DevServiceError,
    ServerHandle,
    Service,
    _pid_alive,
    port_open,
    run_dir,
)

# In start order.
SERVICES: tuple[Service, ...] = (postgres.SERVICE, redis.SERVICE, mosquitto.SERVICE, nats.SERVICE)
DEFAULT_URLS: dict[str, str] = DEFAULT_SERVICE_URLS


def load_dotenv(path: Path | None = None) -> dict[str, str]:
    """The project's .env (see argus.environment)."""
    return read_dotenv(path)


def service_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return base (default os.environ) + .env + default URLs; real environment wins."""
    env = dict(os.environ if base is None else base)
    for key, value in load_dotenv().items():
        env.setdefault(key, value)
    for key, value in DEFAULT_URLS.items():
        if not env.get(key):
            env[key] = value
    return env


def _url_port(parts: SplitResult, service: Service) -> int:
    """Return the URL's port or the service's default one."""
    try:
        port = parts.port
    except ValueError as exc:
        raise DevServiceError(f"{service.name}: bad port in URL {urlunsplit(parts)!r}") from exc
    return port or service.default_port


# --------------------------------------------------------------------------- services from URLs


@dataclass(frozen=True)
class ServiceSpec:
    """One service as configured by its URL."""

    service: Service
    url: str
    host: str
    port: int

    @property
    def name(self) -> str:
        """The service's name (postgres, redis, mosquitto, nats)."""
        return self.service.name

    @property
    def env_var(self) -> str:
        """The variable holding its URL."""
        return self.service.env_var

    @property
    def run_dir(self) -> Path:
        """Return this service's private directory under .run/."""
        return run_dir() / f"{self.name}-{self.port}"

    @property
    def address(self) -> str:
        """Return host:port for display."""
        return f"{self.host}:{self.port}"


def service_specs(env: Mapping[str, str] | None = None) -> list[ServiceSpec]:
    """Return the four services as configured by env (default: os.environ + .env + defaults)."""
    env = service_environ() if env is None else env
    specs = []
    for service in SERVICES:
        # NATS_URL may list a cluster's servers: the helper checks (or starts) the first.
        url = (env.get(service.env_var) or service.default_url).split(",")[0].strip()
        parts = urlsplit(url)
        specs.append(ServiceSpec(service, url, parts.hostname or "127.0.0.1", _url_port(parts, service)))
    return specs


def start_for_spec(spec: ServiceSpec) -> ServerHandle:
    """Start a private server listening exactly where spec's URL points."""
    if spec.host not in LOCAL_HOSTS:
        raise DevServiceError(
            f"{spec.name}: nothing answers at {spec.address} and it is not a local address, "
            f"so no private server can be started there; check {spec.env_var}"
        )
    return spec.service.start_at(urlsplit(spec.url), spec.host, spec.port, spec.run_dir)


def _write_pid_file(spec: ServiceSpec, handle: ServerHandle) -> None:
    """Record a started server so `down` (a later process) can stop it."""
    record = {"service": spec.name, "address": spec.address, "pid": handle.pid, "argv0": handle.argv[0]}
    (spec.run_dir / PID_FILE_NAME).write_text(json.dumps(record) + "\n")


def _read_pid_file(path: Path) -> dict[str, object] | None:
    """Return a pid record if its process is still the server we started, else None."""
    try:
        record: dict[str, object] = json.loads(path.read_text())
        pid = int(str(record["pid"]))
    except (OSError, ValueError, KeyError):
        return None
    if not _pid_alive(pid):
        return None
    # Guard against a recycled pid: the process must still run the binary we started.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return record
    # redis-server rewrites its title to "redis-server host:port", hence the split on spaces.
    argv0 = cmdline.replace("\0", " ").split(" ", 1)[0]
    return record if Path(argv0).name == Path(str(record.get("argv0", ""))).name else None


@contextlib.contextmanager
def _run_lock() -> Iterator[None]:
    """Serialize up/down between concurrent helpers (two `make` targets at once)."""
    base = run_dir()
    base.mkdir(parents=True, exist_ok=True)
    # The project's .gitignore lists .run/ too; this keeps a fresh clone's tree clean regardless.
    gitignore = base / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("*\n")
    with (base / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def up(env: Mapping[str, str] | None = None, echo: Callable[[str], None] = print) -> list[ServerHandle]:
    """Make every service reachable; return handles of the ones started now."""
    started: list[ServerHandle] = []
    with _run_lock():
        try:
            for spec in service_specs(env):
                if port_open(spec.host, spec.port, timeout=1.0):
                    if spec.service.when_running is not None:
                        spec.service.when_running(spec.url)
                    echo(f"{spec.name} {spec.address} (running)")
                    ours = _read_pid_file(spec.run_dir / PID_FILE_NAME) is not None
                    if spec.service.foreign_caveat and not ours:
                        print(f"WARNING {spec.name} {spec.address}: {spec.service.foreign_caveat}", file=sys.stderr)
                    continue
                handle = start_for_spec(spec)
                _write_pid_file(spec, handle)
                started.append(handle)
                echo(f"{spec.name} {spec.address} (started, pid {handle.pid})")
        except BaseException:
            # All or nothing: do not leave half the services running after a failure.
            for handle in reversed(started):
                handle.stop()
            raise
    return started


def down(echo: Callable[[str], None] = print) -> int:
    """Stop every server a previous `up` started (pid files under .run/); return how many."""
    stopped = 0
    if not run_dir().exists():
        return stopped
    with _run_lock():
        for pid_file in sorted(run_dir().glob(f"*/{PID_FILE_NAME}")):
            record = _read_pid_file(pid_file)
            if record is not None:
                pid = int(str(record["pid"]))
                service = str(record.get("service", pid_file.parent.name))
                sig = next((s.stop_signal for s in SERVICES if s.name == service), signal.SIGTERM)
                _stop_pid(pid, sig)
                echo(f"{service} {record.get('address', '')} (stopped, pid {pid})")
                stopped += 1
            pid_file.unlink(missing_ok=True)
    return stopped


def _stop_pid(pid: int, sig: int, timeout: float = STOP_TIMEOUT) -> None:
    """Signal a process that is not our child and wait for it to go, SIGKILL after timeout."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def status(env: Mapping[str, str] | None = None, echo: Callable[[str], None] = print) -> bool:
    """Print one line per service; return whether all of them answer."""
    all_up = True
    for spec in service_specs(env):
        record = _read_pid_file(spec.run_dir / PID_FILE_NAME)
        if port_open(spec.host, spec.port, timeout=1.0):
            owner = f"started by devservices, pid {record['pid']}" if record else "external"
            echo(f"{spec.name} {spec.address} up ({owner})")
        else:
            all_up = False
            echo(f"{spec.name} {spec.address} down")
    return all_up


def run(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Bring services up, run cmd with their URLs in its environment, stop what was started."""
    full_env = service_environ(env)
    started: list[ServerHandle] = []
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        # The command decides how to shut down; we only clean up after it has exited.
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        started = up(full_env)
        try:
            child = subprocess.Popen(list(cmd), env=full_env)
        except OSError as exc:
            print(f"devservices: cannot run {cmd[0]!r}: {exc}", file=sys.stderr)
            return 127
        while True:
            try:
                code = child.wait()
            except KeyboardInterrupt:
                # Ctrl-C reached the command too (same process group); wait for it to finish.
                continue
            # Killed by a signal: report it the way a shell does (128 + signal number).
            return 128 - code if code < 0 else code
    finally:
        signal.signal(signal.SIGTERM, previous)
        for handle in reversed(started):
            handle.stop()
            print(f"{handle.name} {handle.host}:{handle.port} (stopped)", file=sys.stderr)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m devtools.services",
        description="Use running PostgreSQL/Redis/MQTT/NATS from the *_URL variables, or start private ones.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start whatever is not answering (left running)")
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="show what answers")
    run_parser = sub.add_parser("run", help="up, run a command with the service URLs, stop what was started")
    run_parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up()
            return 0
        if args.command == "down":
            if not down():
                print("nothing to stop")
            return 0
        if args.command == "status":
            return 0 if status() else 1
        cmd = list(args.cmd)
        if cmd[:1] == ["--"]:
            cmd = cmd[1:]
        if not cmd:
            parser.error("run needs a command: run -- CMD ARGS...")
        return run(cmd)
    except DevServiceError as exc:
        print(f"devservices: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
