"""redis-server (or valkey-server) with an append-only file: the cache and the Celery broker, whose
queued tasks survive a restart."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from argus.environment import DEFAULT_SERVICE_URLS
from devtools.services.base import (
    READY_TIMEOUT,
    DevServiceError,
    ServerHandle,
    Service,
    _claim_port,
    _make_workdir,
    _start,
    _tcp_banner_check,
    bind_host,
    connect_host,
    find_binary,
)

INSTALL_HINT = "apt-get install redis-server (or valkey-server) or brew install redis"


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
    binary = find_binary(
        "redis", ["redis-server", "valkey-server"], [Path("/usr/bin"), Path("/usr/local/bin")], INSTALL_HINT
    )
    port = _claim_port("redis", bind_host(host), port)
    workdir, owned = _make_workdir("redis", workdir)
    # The Celery broker: tasks queued after a commit (reassembly, alerts, health) must survive a
    # restart, so an append-only file, fsynced every second (what Redis loses on a crash of the
    # machine; a restart of Redis itself loses nothing). No RDB snapshots on top.
    argv = [
        str(binary),
        "--port", str(port),
        "--bind", bind_host(host),
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", "everysec",
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


def _start_at(parts: SplitResult, host: str, port: int, workdir: Path) -> ServerHandle:
    if parts.scheme == "rediss":
        raise DevServiceError("redis: cannot start a private TLS Redis (rediss://); use redis://")
    return start_redis(port, workdir, host=host, password=unquote(parts.password) if parts.password else None)


def check_running(url: str) -> None:
    """What answers at REDIS_URL is a Redis that takes the URL's credentials."""
    import redis

    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or 6379}"
    try:
        redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3).ping()
    except redis.AuthenticationError as exc:
        raise DevServiceError(
            f"redis: the server at {where} refuses REDIS_URL's credentials ({exc}); put its password in the "
            "URL (redis://:PASSWORD@host:port/0), or point REDIS_URL at a free port in .env "
            "(e.g. REDIS_URL=redis://127.0.0.1:6380/0) and the helper starts a private one"
        ) from exc
    except redis.RedisError as exc:
        raise DevServiceError(
            f"redis: what answers at {where} does not behave as Redis ({exc}); point REDIS_URL at a free "
            "port in .env (e.g. REDIS_URL=redis://127.0.0.1:6380/0) and the helper starts one"
        ) from exc


SERVICE = Service(
    "redis", "REDIS_URL", DEFAULT_SERVICE_URLS["REDIS_URL"], INSTALL_HINT, _start_at, when_running=check_running
)
