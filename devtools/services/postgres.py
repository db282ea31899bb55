"""PostgreSQL: initdb on first use, the shipped settings (docker/postgres/argus.conf), the URL's database."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from argus.environment import DEFAULT_SERVICE_URLS
from devtools.services.base import (
    PROJECT_ROOT,
    DevServiceError,
    RunAs,
    ServerHandle,
    Service,
    _claim_port,
    _make_workdir,
    _start,
    bind_host,
    connect_host,
)

POSTGRES_CONF = PROJECT_ROOT / "docker" / "postgres" / "argus.conf"
INSTALL_HINT = "apt-get install postgresql (Debian/Ubuntu) or brew install postgresql@15"


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
        f"Install them: {INSTALL_HINT}"
    )


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


def _closed_parent(path: Path, uid: int) -> Path | None:
    """The first directory on the way to path that the user cannot enter, or None."""
    for parent in [path, *path.parents]:
        st = parent.stat()
        if st.st_uid != uid and not st.st_mode & 0o001:
            return parent
    return None


def _reachable_workdir(workdir: Path, uid: int, gid: int) -> Path:
    """workdir, or, when the postgres user cannot reach it (a checkout in root's 0700 home), a
    directory of its own under /var/tmp named after it, so the same checkout finds it again."""
    closed = _closed_parent(workdir, uid)
    if closed is None:
        return workdir
    digest = hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:12]
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path(tempfile.gettempdir())  # noqa: S108 - checked below
    shadow = base / f"argus-postgres-{digest}"
    shadow.mkdir(mode=0o700, exist_ok=True)
    # A shared directory: the name is predictable, so it must be a real directory that we (or the
    # postgres user, from an earlier run) own, never something another user put there.
    st = os.lstat(shadow)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (os.geteuid(), uid):
        raise DevServiceError(f"postgres: {shadow} exists and is not ours; remove it or set ARGUS_RUN_DIR")
    os.chown(shadow, uid, gid, follow_symlinks=False)
    still = _closed_parent(shadow, uid)
    if still is not None:
        raise DevServiceError(
            f"postgres: user uid={uid} can enter neither {closed} nor {still}; set ARGUS_RUN_DIR to a "
            "directory it can reach"
        )
    (workdir / "DATA_IS_ELSEWHERE").write_text(
        f"The postgres user cannot enter {closed}: this server's data and log are in {shadow}\n"
    )
    return shadow


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
        workdir = _reachable_workdir(workdir, uid, gid)
        datadir, log_path = workdir / "data", workdir / "postgres.log"
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
    where = f"{parts.hostname}:{parts.port or 5432}"
    raise DevServiceError(
        f"postgres: the server at {where} does not accept DATABASE_URL ({_without_password(parts)}): "
        f"{str(last_error).strip()}\n"
        "If it is not a PostgreSQL meant for Argus (a system one on 5432, say), point DATABASE_URL at "
        "a free port in .env, e.g. DATABASE_URL=postgresql://postgres@127.0.0.1:5433/argus, and the "
        "helper starts a private server there; otherwise give the URL a user and password it accepts "
        "(that user must be allowed to create the database, or create it first)."
    )


def _without_password(parts: SplitResult) -> str:
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[2]}" if user else netloc[2]))


def _start_at(parts: SplitResult, host: str, port: int, workdir: Path) -> ServerHandle:
    return start_postgres(
        port,
        workdir,
        host=host,
        user=unquote(parts.username or "postgres"),
        password=unquote(parts.password) if parts.password else None,
        dbname=unquote(parts.path.lstrip("/")) or "postgres",
    )


# SIGTERM is "smart" shutdown, which waits for every client to disconnect; SIGINT ("fast") stops at once.
SERVICE = Service(
    "postgres",
    "DATABASE_URL",
    DEFAULT_SERVICE_URLS["DATABASE_URL"],
    INSTALL_HINT,
    _start_at,
    stop_signal=signal.SIGINT,
    when_running=lambda url: ensure_database(url),
)
