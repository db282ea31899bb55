"""Liveness and readiness probes against real servers that this module starts, stops, freezes
(SIGSTOP) and brings back: never the machine's shared services.

A web process (gunicorn) runs on a private PostgreSQL, Redis and NATS: its /readyz must turn
unready within 5 s of any of them stopping, answer within its time bound while a server is
frozen, and be ready again once the server is back, while /healthz keeps answering 200.
runbridge, runingest and the Celery worker serve /metrics, /healthz and /readyz on their probe
ports. And the metrics these probes report: web requests by route, the consumer's redeliveries
and counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import nats
import pytest
from django.test import Client, override_settings
from prometheus_client import REGISTRY

from argus.health import CheckResult, run_checks
from argus.probes import ProbeServer
from devtools.services import ServerHandle, free_port, start_nats, start_postgres, start_redis
from devtools.supervisor import Child
from telemetry.consumer import IngestConsumer
from telemetry.jetstream import ensure_streams, now_ms, telemetry_headers, telemetry_subject
from tests.conftest import TenantPersona
from tests.pipeline import CeleryProcess, ManagedProcess, pipeline_env, wait_for

ROOT = Path(__file__).resolve().parent.parent
# How soon /readyz must notice a server gone (the bound), and the per-check time bound
# the web runs with (its default).
UNREADY_WITHIN = 5.0
CHECK_TIMEOUT = 2.0


def get(url: str, timeout: float = 10.0) -> tuple[int, Any, float]:
    """(status, parsed JSON body or text, seconds it took)."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a test's own loopback URL
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    took = time.monotonic() - started
    try:
        return status, json.loads(raw), took
    except ValueError:
        return status, raw.decode(errors="replace"), took


def failing(body: dict[str, Any]) -> set[str]:
    return {c["name"] for c in body["checks"] if c["status"] == "fail"}


def create_streams(url: str) -> None:
    """The TELEMETRY stream and the ingest durable, as runingest declares them at start."""

    async def create() -> None:
        nc = await nats.connect(url)
        try:
            await ensure_streams(nc.jetstream())
        finally:
            await nc.close()

    asyncio.run(create())


# --------------------------------------------------------------------------- the private servers


@dataclass
class Servers:
    postgres: ServerHandle
    redis: ServerHandle
    nats: ServerHandle

    def by_name(self, name: str) -> ServerHandle:
        handle: ServerHandle = getattr(self, name)
        return handle


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    # The postgres system user must be able to enter it (pytest's tmp_path is root-only).
    workdir = Path(tempfile.mkdtemp(prefix="argus-probes-test-"))
    workdir.chmod(0o755)
    started: list[ServerHandle] = []
    try:
        started.append(start_postgres(workdir=workdir / "pg", dbname="argus_probes", settings={"fsync": "off"}))
        started.append(start_redis(workdir=workdir / "redis"))
        started.append(start_nats(workdir=workdir / "nats"))
        create_streams(started[2].url)
        yield Servers(*started)
    finally:
        for handle in reversed(started):
            if handle.running():
                # A test that failed half-way may have left it frozen.
                thaw(handle)
            handle.stop()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


@pytest.fixture(scope="module")
def web(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gunicorn web process on the private servers; yields its base URL."""
    log_dir = tmp_path_factory.mktemp("web")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARGUS_", "DJANGO_", "CELERY_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="argus.settings",
        ARGUS_TESTING="1",
        DATABASE_URL=servers.postgres.url,
        REDIS_URL=servers.redis.url,
        NATS_URL=servers.nats.url,
        ARGUS_PKI_DIR=str(log_dir / "pki"),  # no CRL: that check is skipped
        ARGUS_READY_CHECK_TIMEOUT_SECONDS=str(CHECK_TIMEOUT),
    )
    argv = [sys.executable, "-m", "gunicorn", "argus.wsgi", "--config", "gunicorn.conf.py"]
    argv += ["--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4", "--graceful-timeout", "5"]
    process = Child(name="web", argv=argv, log_path=log_dir / "web.log", env=env).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: _answers(f"{url}/healthz"),
            timeout=60,
            what=lambda: f"the web process: {process.log_text()[-3000:]}",
        )
        yield url
    finally:
        process.stop(10)


def _answers(url: str) -> bool:
    try:
        return get(url, timeout=2)[0] == 200
    except OSError:
        return False


def stop_gracefully(handle: ServerHandle) -> None:
    handle.process.send_signal(handle.stop_signal)
    handle.process.wait(20)


def freeze(handle: ServerHandle) -> None:
    os.kill(handle.pid, signal.SIGSTOP)


def thaw(handle: ServerHandle) -> None:
    os.kill(handle.pid, signal.SIGCONT)


def kill(handle: ServerHandle) -> None:
    handle.kill()


# (server, how it goes away, how it comes back, the check that must fail)
OUTAGES: list[tuple[str, Callable[[ServerHandle], None], Callable[[ServerHandle], None], str]] = [
    ("postgres", stop_gracefully, ServerHandle.restart, "database"),
    ("postgres", freeze, thaw, "database"),
    ("redis", kill, ServerHandle.restart, "redis"),
    ("nats", kill, ServerHandle.restart, "jetstream"),
    ("nats", freeze, thaw, "jetstream"),
]


@pytest.mark.parametrize(
    ("server", "stop", "restore", "check"), OUTAGES, ids=[f"{s}-{stop.__name__}" for s, stop, _, _ in OUTAGES]
)
def test_readyz_turns_unready_within_5_s_of_a_server_stopping_and_ready_again_after(
    web: str,
    servers: Servers,
    server: str,
    stop: Callable[[ServerHandle], None],
    restore: Callable[[ServerHandle], None],
    check: str,
) -> None:
    status, body, _ = get(f"{web}/readyz")
    assert status == 200, body
    assert {c["name"] for c in body["checks"]} == {"database", "redis", "jetstream", "lag", "crl"}

    handle = servers.by_name(server)
    stop(handle)
    try:
        stopped = time.monotonic()
        # The checks run side by side: a request in flight at the moment of the freeze can have
        # one check answered just before it and another cut off (lag failing, jetstream not yet),
        # so wait for the answer that names the check.
        status, body, took = wait_for(
            lambda: (answer := get(f"{web}/readyz"))[0] == 503 and check in failing(answer[1]) and answer,
            timeout=UNREADY_WITHIN,
            interval=0.2,
            what=f"/readyz to fail its {check} check with {server} stopped",
        )
        assert time.monotonic() - stopped < UNREADY_WITHIN
        # Bounded while it is down or frozen: the check's timeout, not the server, decides.
        assert took < CHECK_TIMEOUT + 1.5, f"/readyz took {took:.1f} s"
        # Liveness asks no dependency.
        assert get(f"{web}/healthz", timeout=3)[:2] == (200, {"status": "ok"})
    finally:
        restore(handle)
    wait_for(lambda: get(f"{web}/readyz")[0] == 200, timeout=30, interval=0.5, what=f"/readyz after {server} is back")


def test_healthz_and_readyz_answer_on_any_host_before_the_tenant_middleware(web: str, servers: Servers) -> None:
    # The private database has no tables at all: the tenant lookup would fail, the probes do not.
    request = urllib.request.Request(f"{web}/readyz", headers={"Host": "no-such-tenant.invalid"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        assert response.status == 200
    status, body, _ = get(f"{web}/metrics")
    assert status == 200
    # gunicorn.conf.py's multiprocess mode: the request counter is the workers' sum.
    assert 'argus_web_requests_total{method="GET",route="readyz",status="200"}' in body


# --------------------------------------------------------------------------- the probe server


def test_the_probe_server_answers_healthz_readyz_and_metrics_on_the_configured_address() -> None:
    verdict = {"ok": True}

    def switch_check() -> CheckResult:
        return CheckResult("switch", verdict["ok"], "" if verdict["ok"] else "switched off")

    with override_settings(ARGUS_WORKER_METRICS_ADDR="127.0.0.2"):
        server = ProbeServer(0, lambda: run_checks([switch_check])).start()
    try:
        assert server.addr == "127.0.0.2"
        base = f"http://127.0.0.2:{server.port}"
        assert get(f"{base}/healthz")[:2] == (200, {"status": "ok"})
        assert get(f"{base}/readyz")[:2] == (
            200,
            {"status": "ok", "checks": [{"name": "switch", "status": "ok", "detail": ""}]},
        )
        verdict["ok"] = False
        status, body, _ = get(f"{base}/readyz")
        assert status == 503 and body["status"] == "fail" and failing(body) == {"switch"}
        status, text, _ = get(f"{base}/metrics")
        assert status == 200 and "python_info" in text
    finally:
        server.stop()


def test_a_check_that_hangs_counts_as_failed_once_its_time_is_up() -> None:
    def hangs_check() -> CheckResult:
        time.sleep(5)
        return CheckResult("hangs", True)

    def fine_check() -> CheckResult:
        return CheckResult("fine", True)

    started = time.monotonic()
    results = run_checks([hangs_check, fine_check], timeout=0.5)
    assert time.monotonic() - started < 1.5
    assert [(r.name, r.status) for r in results] == [("hangs", "fail"), ("fine", "ok")]
    assert results[0].detail == "no answer within 0.5 s"


# --------------------------------------------------------------------------- the long-running processes


def test_runbridge_runingest_and_the_worker_serve_their_probes(
    broker: ServerHandle, nats_server: ServerHandle, live_db: None, tmp_path: Path
) -> None:
    env = pipeline_env(
        mqtt_url=f"mqtt://127.0.0.1:{broker.port}", nats_url=nats_server.url, client_id=f"probes-{uuid.uuid4().hex[:8]}"
    )
    ports = {"runbridge": free_port(), "runingest": free_port(), "worker": free_port()}
    env.update(
        ARGUS_BRIDGE_METRICS_PORT=str(ports["runbridge"]),
        ARGUS_INGEST_METRICS_PORT=str(ports["runingest"]),
        ARGUS_CELERY_METRICS_PORT=str(ports["worker"]),
        ARGUS_WORKER_METRICS_ADDR="127.0.0.1",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "worker-metrics"),
    )
    bridge_env = {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    processes = [
        ManagedProcess("runbridge", ["runbridge"], bridge_env, tmp_path),
        ManagedProcess("runingest", ["runingest"], bridge_env, tmp_path),
        CeleryProcess("worker", ["worker", "--loglevel=INFO", "--concurrency=2", "--without-gossip"], env, tmp_path),
    ]
    for process in processes:
        process.start()
    expected = {
        "runbridge": ({"mqtt", "nats"}, "argus_bridge_mqtt_connected"),
        "runingest": ({"database", "nats", "lag"}, "argus_ingest_pending_messages"),
        "worker": (
            {"database", "redis"},
            'argus_celery_tasks_total{state="SUCCESS",task="telemetry.tasks.partitions_ensure_all"}',
        ),
    }
    try:
        for name, port in ports.items():
            base = f"http://127.0.0.1:{port}"
            wait_for(partial(_ready, base), timeout=60, what=partial(_log, processes, name))
            assert get(f"{base}/healthz")[:2] == (200, {"status": "ok"})
            body = get(f"{base}/readyz")[1]
            assert {c["name"] for c in body["checks"]} == expected[name][0], body

        from argus.celery import app

        app.send_task("telemetry.tasks.partitions_ensure_all")
        for name, port in ports.items():
            metric = expected[name][1]
            wait_for(partial(_metrics_have, port, metric), timeout=30, what=f"{metric} on {name}'s /metrics")

        # NATS gone: the bridge and the consumer say so on their /readyz within 5 s, and recover.
        nats_server.kill()
        try:
            for name in ("runbridge", "runingest"):
                base = f"http://127.0.0.1:{ports[name]}"
                body = wait_for(
                    partial(_unready, base),
                    timeout=UNREADY_WITHIN,
                    interval=0.2,
                    what=f"{name}'s /readyz to fail without NATS",
                )
                assert "nats" in failing(body), body
        finally:
            nats_server.restart(graceful=False)
        for name in ("runbridge", "runingest"):
            base = f"http://127.0.0.1:{ports[name]}"
            wait_for(partial(_ready, base), timeout=30, what=f"{name}'s /readyz after NATS is back")

        # NATS frozen: the connections look connected for minutes; a ping through them does not.
        freeze(nats_server)
        try:
            for name in ("runbridge", "runingest"):
                base = f"http://127.0.0.1:{ports[name]}"
                _, body, took = wait_for(
                    partial(_unready_answer, base), timeout=UNREADY_WITHIN, what=f"{name}'s /readyz with NATS frozen"
                )
                assert "nats" in failing(body) and took < CHECK_TIMEOUT + 1.5, (body, took)
        finally:
            thaw(nats_server)
        for name in ("runbridge", "runingest"):
            base = f"http://127.0.0.1:{ports[name]}"
            wait_for(partial(_ready, base), timeout=30, what=f"{name}'s /readyz after NATS is thawed")
    finally:
        for process in processes:
            process.stop()


def _ready(base: str) -> bool:
    try:
        return get(f"{base}/readyz", timeout=5)[0] == 200
    except OSError:
        return False


def _unready(base: str) -> dict[str, Any] | None:
    status, body, _ = get(f"{base}/readyz", timeout=5)
    return body if status == 503 else None


def _unready_answer(base: str) -> tuple[int, Any, float] | None:
    answer = get(f"{base}/readyz", timeout=10)
    return answer if answer[0] == 503 else None


def _metrics_have(port: int, metric: str) -> bool:
    return metric in get(f"http://127.0.0.1:{port}/metrics")[1]


def _log(processes: list[Any], name: str) -> str:
    return f"{name}'s /readyz: " + next(p for p in processes if p.name == name).log()


# --------------------------------------------------------------------------- metrics of the units


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_it_counts_web_requests_by_route_name_never_by_path(db: None, alpha: TenantPersona) -> None:
    client = Client(HTTP_HOST=alpha.host)
    routes = {"route": "telemetry-ingest", "method": "POST", "status": "401"}
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    probe = {"route": "healthz", "method": "GET", "status": "200"}
    before = {key: _sample("argus_web_requests_total", labels) for key, labels in enumerate((routes, unmatched, probe))}
    client.post("/api/v1/telemetry", data=b"{}", content_type="application/json")
    client.get(f"/no/such/page/{uuid.uuid4().hex}")
    client.get("/healthz")
    for key, labels in enumerate((routes, unmatched, probe)):
        assert _sample("argus_web_requests_total", labels) == before[key] + 1, labels
    assert _sample("argus_web_request_seconds_count", {"route": "healthz", "method": "GET"}) >= 1


def test_it_counts_redeliveries_and_reads_the_consumer_counts_for_readiness(nats_server: ServerHandle) -> None:
    async def scenario() -> tuple[float, int | None, int | None, str]:
        consumer = IngestConsumer(nats_url=nats_server.url)
        await consumer.start()
        nc = await nats.connect(nats_server.url)
        try:
            headers = telemetry_headers(logical_id="probe-device", received_ms=now_ms(), transport="http")
            await nc.jetstream().publish(telemetry_subject("alpha", 1), b"{}", headers=headers)
            assert consumer._sub is not None
            (first,) = await consumer._sub.fetch(1, timeout=5)
            await first.nak()
            (again,) = await consumer._sub.fetch(1, timeout=5)
            before = _sample("argus_ingest_redeliveries_total")
            delivery, _ = consumer._open(again)
            assert delivery is not None and delivery.deliveries == 2
            counted = _sample("argus_ingest_redeliveries_total") - before
            consumer._last_lag_check = 0.0
            await consumer._report_lag()
            pending, ack_pending = consumer.pending, consumer.ack_pending
            lag = consumer._lag_check()
            await again.ack()
            return counted, pending, ack_pending, lag.status
        finally:
            await nc.close()
            await consumer.close()

    counted, pending, ack_pending, lag = asyncio.run(scenario())
    assert counted == 1
    assert (pending, ack_pending) == (0, 1)  # the redelivered message is out, not yet acknowledged
    assert _sample("argus_ingest_ack_pending_messages") == 1
    assert lag == "ok"
