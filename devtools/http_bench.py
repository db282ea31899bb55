"""HTTP ingestion benchmark (issue 14, item 5): requests/s, readings/s and latency of
`POST /api/v1/telemetry` through gunicorn, with device API keys, single readings and batches.

    DEBUG=1 .venv/bin/python -m devtools.http_bench        (make http-bench)

Runs a private nats-server, runingest and gunicorn (`argus.wsgi`, gunicorn.conf.py, DEBUG off as
deployed) in tenant `bench`; BENCH_HTTP_DEVICES endpoint devices each get a fresh API key (earlier runs' keys are
revoked). The load generator is this process: one asyncio event loop holding
BENCH_HTTP_CONNECTIONS keep-alive connections, each sending as fast as it is answered (a closed
loop: the rate is what the server sustains at that concurrency), requests spread over the devices.

Each phase (`single`: one reading per request; `batch`: a list of BENCH_HTTP_BATCH readings) runs
BENCH_SECONDS. Every 202 is remembered with the exact bytes it acknowledged; after the phase the
run waits until runingest has stored them and compares (device, md5 of the payload) with
telemetry_raw, so an acknowledged message that is not stored, or not accepted, fails the run, as
does any answer other than 202 or a connection error.

The per-device rate limit (ARGUS_HTTP_RATE_LIMIT, 600/min by default) is raised to
BENCH_HTTP_RATE_LIMIT (1000000/min) for the server: the benchmark measures capacity, not the
limiter (each request still runs the limiter's Redis INCR).

Environment: BENCH_SECONDS (30 per phase), BENCH_HTTP_PHASES (single,batch), BENCH_HTTP_DEVICES
(500), BENCH_HTTP_CONNECTIONS (32), BENCH_HTTP_BATCH (100), BENCH_HTTP_WORKERS (gunicorn
--workers, 2), BENCH_HTTP_THREADS (--threads, 8), BENCH_HTTP_WORKER_CLASS (gthread),
BENCH_HTTP_RATE_LIMIT. The last line is one JSON object; the exit status is 1 when the run failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "argus.settings")
django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django_tenants.utils import schema_context  # noqa: E402

from argus.models import DeviceAPIKey  # noqa: E402
from devices.models import DeviceRole, ProcessingMode  # noqa: E402
from devices.services import api_key_create  # noqa: E402
from devtools.bench import (  # noqa: E402
    SCHEMA,
    child_pids,
    create_missing_devices,
    ensure_device_type,
    ensure_tenant,
    max_raw_id,
    migrate_database,
)
from devtools.measure import DRAIN_IDLE_SECONDS, ProcSampler, percentile  # noqa: E402
from devtools.services import free_port, start_nats  # noqa: E402
from devtools.supervisor import Supervisor, http_ok, manage  # noqa: E402

TYPE_NAME = "Bench HTTP Endpoint"
METRICS = ("temperature", "humidity")
URL_PATH = "/api/v1/telemetry"
_READING: dict[str, Any] = {
    "type": "object",
    "required": ["values"],
    "properties": {"values": {"type": "object", "additionalProperties": {"type": "number"}}},
}
MESSAGE_SCHEMA: dict[str, Any] = {"anyOf": [_READING, {"type": "array", "items": _READING}]}
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def log(text: str) -> None:
    print(f"http-bench: {text}", flush=True)


@dataclass(frozen=True)
class HttpBenchSettings:
    seconds: float
    phases: tuple[str, ...]
    devices: int
    connections: int
    batch: int
    workers: int
    threads: int
    worker_class: str
    rate_limit: str

    @classmethod
    def from_env(cls) -> HttpBenchSettings:
        env = os.environ.get
        phases = tuple(p.strip() for p in env("BENCH_HTTP_PHASES", "single,batch").split(",") if p.strip())
        unknown = set(phases) - {"single", "batch"}
        if unknown or not phases:
            raise SystemExit(f"BENCH_HTTP_PHASES: phases are single and batch, not {sorted(unknown) or 'none'}")
        return cls(
            seconds=float(env("BENCH_SECONDS", "30")),
            phases=phases,
            devices=int(env("BENCH_HTTP_DEVICES", "500")),
            connections=int(env("BENCH_HTTP_CONNECTIONS", "32")),
            batch=int(env("BENCH_HTTP_BATCH", "100")),
            workers=int(env("BENCH_HTTP_WORKERS", "2")),
            threads=int(env("BENCH_HTTP_THREADS", "8")),
            worker_class=env("BENCH_HTTP_WORKER_CLASS", "gthread"),
            rate_limit=env("BENCH_HTTP_RATE_LIMIT", "1000000/min"),
        )


# --------------------------------------------------------------------------- fixtures


def ensure_devices(count: int) -> list[str]:
    """Endpoint devices BENCH-H-00000… in tenant `bench` (created once), of a type whose message
    schema takes one reading or a list of them (the schema applies to the whole body)."""
    ensure_tenant(SCHEMA, "Benchmark", log)
    ids = [f"BENCH-H-{i:05d}" for i in range(count)]
    with schema_context(SCHEMA), transaction.atomic():
        device_type = ensure_device_type(
            TYPE_NAME,
            MESSAGE_SCHEMA,
            description="Created by devtools.http_bench",
            processing_mode=ProcessingMode.ENDPOINT,
            metrics=list(METRICS),
        )
        create_missing_devices(device_type, ids, role=DeviceRole.STANDALONE)
    return ids


def fresh_keys(ids: list[str]) -> dict[str, str]:
    """A new API key per device; the keys of earlier runs are revoked (they were never kept)."""
    DeviceAPIKey.objects.filter(logical_identifier__in=ids, revoked=False).update(revoked=True)
    return {logical_id: api_key_create(logical_id=logical_id, tenant_schema=SCHEMA)[1] for logical_id in ids}


# --------------------------------------------------------------------------- load generator


@dataclass
class PhaseResult:
    """What one phase's load generator saw."""

    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    connection_errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    # (device, md5 of the body) of every request answered 202, and its readings
    acked: list[tuple[str, str]] = field(default_factory=list)
    acked_readings: int = 0
    duration: float = 0.0
    first_errors: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        if len(self.first_errors) < 5:
            self.first_errors.append(text)


class Bodies:
    """Request bodies per device: unique msg_ids (single) or strictly increasing device times
    (batch), so that every acknowledged body is one stored row."""

    def __init__(self, run_id: str, batch: int) -> None:
        self.run_id = run_id
        self.batch = batch
        self.seq = 0
        self.last_ms: dict[str, int] = {}

    def _ts(self, device: str, count: int) -> int:
        start = max(int(time.time() * 1000), self.last_ms.get(device, 0) + 1)
        self.last_ms[device] = start + count - 1
        return start

    def single(self, device: str) -> bytes:
        self.seq += 1
        ts = self._ts(device, 1)
        return (
            f'{{"msg_id":"{self.run_id}-{self.seq}","ts":{ts},'
            f'"values":{{"temperature":{20 + self.seq % 50 / 10},"humidity":{40 + self.seq % 30}}}}}'
        ).encode()

    def batched(self, device: str) -> bytes:
        self.seq += 1
        ts = self._ts(device, self.batch)
        items = ",".join(
            f'{{"ts":{ts + i},"values":{{"temperature":{20 + (self.seq + i) % 50 / 10},"humidity":{40 + i % 30}}}}}'
            for i in range(self.batch)
        )
        return f"[{items}]".encode()


async def _connection(
    port: int,
    host: str,
    devices: list[tuple[str, str]],
    make_body: Any,
    readings_per_body: int,
    deadline: float,
    result: PhaseResult,
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    turn = 0
    while time.monotonic() < deadline:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                result.connection_errors += 1
                result.error(f"connect: {exc!r}")
                await asyncio.sleep(0.1)
                continue
        assert reader is not None
        device, key = devices[turn % len(devices)]
        turn += 1
        body = make_body(device)
        request = (
            f"POST {URL_PATH} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Api-Key {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        started = time.perf_counter()
        result.sent += 1
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            close = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            answer = await reader.readexactly(length) if length else b""
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            result.connection_errors += 1
            result.error(f"request: {exc!r}")
            writer.close()
            writer = None
            continue
        result.latencies_ms.append((time.perf_counter() - started) * 1000)
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if status == 202:
            result.acked.append((device, hashlib.md5(body).hexdigest()))  # noqa: S324  # PostgreSQL's md5()
            result.acked_readings += readings_per_body
        else:
            result.error(f"{status}: {answer[:200]!r}")
        if close:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


def run_phase(
    port: int, keys: dict[str, str], bodies: Bodies, phase: str, connections: int, seconds: float
) -> PhaseResult:
    """Drive the server for `seconds` with `connections` keep-alive connections."""
    result = PhaseResult()
    devices = list(keys.items())
    make_body = bodies.single if phase == "single" else bodies.batched
    # Readings as the platform counts them (telemetry_raw.readings): one per metric value.
    per_body = len(METRICS) * (1 if phase == "single" else bodies.batch)
    host = f"{SCHEMA}.localhost"

    async def main() -> None:
        deadline = time.monotonic() + seconds
        # Each connection takes its own slice of the devices, so one device's times stay ordered.
        slices = [devices[i::connections] or devices for i in range(connections)]
        await asyncio.gather(*(_connection(port, host, s, make_body, per_body, deadline, result) for s in slices))

    started = time.monotonic()
    asyncio.run(main())
    result.duration = time.monotonic() - started
    return result


# --------------------------------------------------------------------------- verification


def stored_bodies(base_id: int) -> dict[tuple[str, str], tuple[str, int]]:
    """(device, md5 of the payload) -> (status, readings) of the HTTP raw rows after base_id."""
    with schema_context(SCHEMA), connection.cursor() as cursor:
        cursor.execute(
            "SELECT logical_identifier, md5(payload), status, readings FROM telemetry_raw "
            "WHERE id > %s AND transport = 'http'",
            [base_id],
        )
        return {(r[0], r[1]): (r[2], r[3]) for r in cursor.fetchall()}


def wait_stored(base_id: int, acked: list[tuple[str, str]]) -> tuple[dict[tuple[str, str], tuple[str, int]], bool]:
    """Wait until every acknowledged body is stored, as long as rows keep arriving."""
    wanted = set(acked)
    count, last_change = -1, time.monotonic()
    while True:
        stored = stored_bodies(base_id)
        if wanted <= stored.keys():
            return stored, True
        if len(stored) != count:
            count, last_change = len(stored), time.monotonic()
        elif time.monotonic() - last_change > DRAIN_IDLE_SECONDS:
            return stored, False
        time.sleep(1.0)


def phase_report(phase: str, result: PhaseResult, base_id: int, sampler: ProcSampler) -> dict[str, Any]:
    stored, drained = wait_stored(base_id, result.acked)
    missing = [k for k in result.acked if k not in stored]
    not_accepted = [k for k in result.acked if k in stored and stored[k][0] != "accepted"]
    latencies = sorted(result.latencies_ms)
    answered = len(latencies)
    requests_per_s = answered / result.duration if result.duration else 0.0
    web_cpu = sampler.cpu_seconds("web")
    report: dict[str, Any] = {
        "requests_sent": result.sent,
        "answered": answered,
        "acked": len(result.acked),
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "connection_errors": result.connection_errors,
        "requests_per_s": round(requests_per_s, 1),
        "readings_per_s": round(result.acked_readings / result.duration, 1) if result.duration else 0.0,
        "p50_ms": round(percentile(latencies, 0.5), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(latencies[-1], 2) if latencies else None,
        "drain_complete": drained,
        "lost": len(missing),
        "not_accepted": len(not_accepted),
        "stored_readings": sum(stored[k][1] for k in result.acked if k in stored),
        "acked_readings": result.acked_readings,
        "web_core_ms_per_request": round(web_cpu * 1000 / answered, 3) if answered else None,
        **{f"cpu_cores_{name}": round(sampler.cores(name), 2) for name in sampler.groups},
        "cpu_cores_machine": round(sampler.machine_cores(), 2),
        "first_errors": result.first_errors,
    }
    return {f"{phase}_{key}": value for key, value in report.items()}


def failures(report: dict[str, Any]) -> list[str]:
    """Why the run failed (empty: passed): a phase with nothing acknowledged, an answer other than
    202, a connection error, an acknowledged message not stored or not accepted, readings missing,
    a child that did not exit cleanly."""
    problems = []
    for phase in report["phases"]:
        p = f"{phase}_"
        if not report[p + "acked"]:
            problems.append(f"{phase}: nothing acknowledged")
        others = {status: n for status, n in report[p + "statuses"].items() if status != "202"}
        if others:
            problems.append(f"{phase}: answers other than 202: {others}")
        if report[p + "connection_errors"]:
            problems.append(f"{phase}: connection_errors={report[p + 'connection_errors']}")
        for key in ("lost", "not_accepted"):
            if report[p + key]:
                problems.append(f"{phase}: {key}={report[p + key]} of {report[p + 'acked']} acknowledged")
        stored, acked = report[p + "stored_readings"], report[p + "acked_readings"]
        if stored != acked:
            problems.append(f"{phase}: readings stored {stored} of {acked} acknowledged")
        if report[p + "drain_complete"] is False:
            problems.append(f"{phase}: drain_complete=False")
    problems += [f"{name} exited with {code}" for name, code in report["exit_codes"].items() if code != 0]
    return problems


# --------------------------------------------------------------------------- main


def main() -> int:
    bench = HttpBenchSettings.from_env()
    migrate_database(log)
    ids = ensure_devices(bench.devices)
    keys = fresh_keys(ids)
    run_id = f"h{time.strftime('%m%d%H%M%S')}{uuid.uuid4().hex[:4]}"
    log_dir = Path(settings.BASE_DIR) / ".run" / "http-bench" / run_id
    log_dir.mkdir(parents=True, exist_ok=True)
    nats = start_nats(workdir=log_dir / "nats")
    port = free_port()
    env = dict(os.environ)
    env.update(
        NATS_URL=nats.url,
        ARGUS_INGEST_METRICS_PORT="0",
        ARGUS_HTTP_RATE_LIMIT=bench.rate_limit,
    )
    # The web server as deployed, DEBUG off (DEBUG keeps every query of a request in memory and
    # costs a web worker CPU per request); plain HTTP on loopback.
    web_env = dict(
        env,
        DEBUG="0",
        SECRET_KEY=env.get("SECRET_KEY") or uuid.uuid4().hex * 2,
        ALLOWED_HOSTS=f"{SCHEMA}.localhost,localhost,127.0.0.1",
        ARGUS_HTTPS="0",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # gunicorn.conf.py gives the server its own
    web_argv = [
        *(sys.executable, "-m", "gunicorn", "argus.wsgi", "--config", "gunicorn.conf.py"),
        *("--bind", f"127.0.0.1:{port}", "--workers", str(bench.workers), "--threads", str(bench.threads)),
        *("--worker-class", bench.worker_class, "--backlog", "2048"),
    ]
    supervisor = Supervisor(log_dir, env)
    supervisor.add("runingest#0", manage("runingest"))
    web = supervisor.add("web", web_argv, ready=http_ok(f"http://127.0.0.1:{port}/healthz"))
    web.env = web_env
    report: dict[str, Any] = {
        "phases": list(bench.phases),
        "seconds_per_phase": bench.seconds,
        "devices": bench.devices,
        "connections": bench.connections,
        "batch": bench.batch,
        "gunicorn_workers": bench.workers,
        "gunicorn_threads": bench.threads,
        "gunicorn_worker_class": bench.worker_class,
        "rate_limit": bench.rate_limit,
    }
    exit_codes: dict[str, int | None] = {}
    try:
        supervisor.start()
        supervisor.wait_ready(READY_TIMEOUT)
        log(f"run {run_id}: gunicorn on port {port}, logs in {log_dir}")
        bodies = Bodies(run_id, bench.batch)
        # Warm-up: every device once (connections, caches, the stream), then wait until stored.
        base_id = max_raw_id()
        warm = run_phase(port, keys, bodies, "single", bench.connections, 3.0)
        if warm.statuses.get(202, 0) == 0:
            raise SystemExit(f"warm-up: no request accepted: {warm.statuses} {warm.first_errors}")
        _, drained = wait_stored(base_id, warm.acked)
        if not drained:
            raise SystemExit("warm-up: acknowledged messages were not stored")
        for phase in bench.phases:
            base_id = max_raw_id()
            sampler = ProcSampler(
                {
                    "web": [web.pid, *child_pids(web.pid)],
                    "ingest": [supervisor.child("runingest#0").pid],
                    "nats": [nats.pid],
                    "load_generator": [os.getpid()],
                }
            )
            log(f"{phase}: {bench.connections} connections for {bench.seconds:g} s")
            sampler.mark_start()
            result = run_phase(port, keys, bodies, phase, bench.connections, bench.seconds)
            sampler.mark_end()
            log(f"{phase}: {len(result.latencies_ms)} answered in {result.duration:.1f} s; waiting until stored")
            report.update(phase_report(phase, result, base_id, sampler))
    finally:
        exit_codes = supervisor.stop([["web"]], STOP_TIMEOUT)
        nats.stop()
    report["exit_codes"] = exit_codes
    problems = failures(report)
    for problem in problems:
        log(f"FAILED: {problem}")
    # The JSON object is the last line: scripts read it with `tail -n 1`.
    print(json.dumps(report), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
