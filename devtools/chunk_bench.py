"""Chunked-gateway benchmark (issue 4): how soon after its last chunk a 2000-beacon, 67-chunk
transaction is fully stored, while BENCH_TX_RATE such transactions per second arrive.

    DEBUG=1 .venv/bin/python -m devtools.chunk_bench

Runs a private Mosquitto and nats-server, runbridge, runingest and `celery -A argus worker -c 2`
(on a private redis-server unless BENCH_CELERY_BROKER_URL names one, so no other worker takes its tasks) in
tenant `bench`. Latency is telemetry_transactions.completed_at - last_chunk_at: from the bridge
receiving the last chunk to the reassembly writing every reading. The last line is one JSON object.

Endpoint traffic flows at the same time (BENCH_ENDPOINT_RATE messages/s of 4 readings from
BENCH_ENDPOINT_DEVICES devices); its latency (device ts to stored_at) and losses are reported too.
Before the measured run the churned tables of tenant `bench` are vacuumed, as autovacuum would
have done (it is off on our CI machine's PostgreSQL). The report gives PostgreSQL's settings that
matter at this write rate (`pg_shared_buffers`, `pg_max_wal_size`, ...) and what its WAL did in
the measured window: MB/s, full-page images/s and checkpoints, timed or requested (started
because max_wal_size filled up). After every checkpoint each hot index page is logged whole
again: those are the latency spikes, one every ~20 s with a stock max_wal_size at 20
transactions/s (BENCHMARKS.md).

Environment: BENCH_TX_RATE (transactions/s; 20), BENCH_SECONDS (20), BENCH_GATEWAYS (20),
BENCH_WORKER_CONCURRENCY (2), BENCH_INGESTERS (1), BENCH_BEACON_METRICS (readings per beacon: 1, as
the issue counts 2000 beacons as 2000 readings; 2 adds battery), BENCH_ENDPOINT_RATE (1000; 0 for
none), BENCH_ENDPOINT_DEVICES (1000).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "argus.settings")
django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django_tenants.utils import schema_context  # noqa: E402

from devices.models import DeviceRole, ProcessingMode  # noqa: E402
from devtools.bench import (  # noqa: E402
    SCHEMA,
    BenchSettings,
    child_pids,
    count_stored,
    create_missing_devices,
    ensure_bench_devices,
    ensure_device_type,
    ensure_tenant,
    max_raw_id,
    migrate_database,
    pipeline_pids,
    postgres_activity,
    postgres_server_settings,
    start_pipeline,
    stop_pipeline,
    stored_rows,
)
from devtools.measure import DRAIN_IDLE_SECONDS, ProcSampler, percentile  # noqa: E402
from devtools.services import start_mosquitto, start_nats, start_redis  # noqa: E402
from devtools.simulator import (  # noqa: E402
    CHILD_METRICS,
    SimulatorConfig,
    SimulatorResult,
    chunk_count,
    run_simulation,
)

TYPE_NAME = "Bench Chunked Gateway"
BEACONS = 2000
CHUNK_SIZE = 30
WORKER_FLAGS = ("--without-gossip", "--without-mingle", "--purge")
# The seed's BLE gateway schema (fixtures/iot_seed.json): reassembly validates 2000 children against it.
MESSAGE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["children"],
    "properties": {
        "children": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "values"],
                "properties": {
                    "values": {
                        "type": "object",
                        "properties": {
                            "rssi": {"type": "number", "minimum": -130, "maximum": 0},
                            "battery": {"type": "number", "minimum": 0, "maximum": 100},
                        },
                    }
                },
            },
        }
    },
}
CHURNED_TABLES = ("telemetry_chunks", "telemetry_transactions", "devices", "assets")


def log(text: str) -> None:
    print(f"chunk-bench: {text}", flush=True)


def ensure_gateways(count: int) -> list[str]:
    ensure_tenant(SCHEMA, "Benchmark", log)
    ids = [f"BENCH-C-{i:05d}" for i in range(count)]
    with schema_context(SCHEMA), transaction.atomic():
        device_type = ensure_device_type(
            TYPE_NAME,
            MESSAGE_SCHEMA,
            description="Created by devtools.chunk_bench",
            processing_mode=ProcessingMode.GATEWAY_CHUNKED,
            metrics=list(CHILD_METRICS),
            auto_register_children=True,
            max_children=5000,
            max_chunks=100,
        )
        create_missing_devices(device_type, ids, role=DeviceRole.GATEWAY)
    return ids


def transactions(prefix: str) -> list[tuple[str, float | None, int, int]]:
    """(status, completed - last chunk in ms, received, readings) of this run's transactions."""
    with schema_context(SCHEMA), connection.cursor() as cursor:
        cursor.execute(
            "SELECT status, extract(epoch FROM completed_at - last_chunk_at) * 1000, received_chunks, readings "
            "FROM telemetry_transactions WHERE transaction_id LIKE %s",
            [prefix.replace("_", "\\_") + "%"],
        )
        return [(r[0], float(r[1]) if r[1] is not None else None, r[2], r[3]) for r in cursor.fetchall()]


def wait_done(prefix: str, expected: int, timeout: float) -> list[tuple[str, float | None, int, int]]:
    deadline = time.monotonic() + timeout
    rows = transactions(prefix)
    while time.monotonic() < deadline:
        rows = transactions(prefix)
        if len(rows) >= expected and all(r[0] != "pending" for r in rows):
            break
        time.sleep(0.5)
    return rows


def vacuum_churned_tables() -> None:
    """VACUUM what the benchmark churns in tenant `bench`."""
    with schema_context(SCHEMA), connection.cursor() as cursor:
        for table in CHURNED_TABLES:
            cursor.execute(f"VACUUM (ANALYZE) {table}")


def postgres_cpu_seconds() -> float:
    """CPU seconds of every PostgreSQL server process so far, those that have exited included.

    Backends come and go during a run: the postmaster's reaped-children times (cutime, cstime)
    hold the CPU of those that exited, the live processes their own.
    """
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() not in ("postgres", "postmaster"):
                continue
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            parent = Path(f"/proc/{fields[1]}/comm").read_text().strip()
        except OSError:
            continue
        times = [int(f) for f in fields[11:15]]  # utime, stime, cutime, cstime
        total += sum(times if parent not in ("postgres", "postmaster") else times[:2]) / os.sysconf("SC_CLK_TCK")
    return total


def wait_stored(base_id: int, prefix: str, sent: int) -> bool:
    """Wait until `sent` messages under prefix are stored, as long as rows keep arriving; False
    when none has for DRAIN_IDLE_SECONDS."""
    stored, last_change = -1, time.monotonic()
    while True:
        now_stored = count_stored(base_id, prefix)
        if now_stored >= sent:
            return True
        if now_stored != stored:
            stored, last_change = now_stored, time.monotonic()
        elif time.monotonic() - last_change > DRAIN_IDLE_SECONDS:
            return False
        time.sleep(0.5)


def endpoint_report(base_id: int, prefix: str, result: SimulatorResult | None, drained: bool) -> dict[str, Any]:
    """Latency (device ts to stored_at) and losses of the endpoint traffic sent alongside."""
    if result is None:
        return {}
    rows = stored_rows(base_id, prefix)
    latencies = sorted(r.stored_ms - r.ts_ms for r in rows if r.ts_ms is not None)
    expected = set(result.msg_ids())
    stored = {r.msg_id for r in rows}
    return {
        "endpoint_msgs_per_s": round(result.achieved_rate, 1),
        "endpoint_sent": result.sent,
        "endpoint_acked_by_broker": result.acked,
        "endpoint_sim_errors": result.errors,
        "endpoint_drain_complete": drained,
        "endpoint_lost": len(expected - stored),
        "endpoint_unexpected": len(rows) - len(stored & expected),
        "endpoint_rejected": sum(r.status != "accepted" for r in rows),
        "endpoint_p50_latency_ms": round(percentile(latencies, 0.5), 1),
        "endpoint_p99_latency_ms": round(percentile(latencies, 0.99), 1),
    }


def failures(report: dict[str, Any]) -> list[str]:
    """Why the run counts as failed (empty: passed): a transaction not complete, readings missing,
    anything of the endpoint feed lost, rejected or not drained, a message the broker did not
    acknowledge, a child that did not exit cleanly."""
    problems = []
    sent, statuses = report["transactions_sent"], report["transactions"]
    if not sent:
        problems.append("transactions_sent=0")
    if statuses.get("complete", 0) != sent:
        problems.append(f"complete transactions {statuses.get('complete', 0)} of {sent} ({statuses})")
    if report["readings"] != report["readings_expected"]:
        problems.append(f"readings {report['readings']} of {report['readings_expected']}")
    for key in ("sim_errors", "endpoint_lost", "endpoint_unexpected", "endpoint_rejected", "endpoint_sim_errors"):
        if report.get(key):
            problems.append(f"{key}={report[key]}")
    if report.get("endpoint_drain_complete") is False:
        problems.append("endpoint_drain_complete=False")
    for sent_key, acked_key in (
        ("chunks_sent", "chunks_acked_by_broker"),
        ("endpoint_sent", "endpoint_acked_by_broker"),
    ):
        if sent_key in report and report[acked_key] < report[sent_key]:
            problems.append(f"{sent_key}: {report[sent_key] - report[acked_key]} not acknowledged by the broker")
    problems += [f"{name} exited with {code}" for name, code in report["exit_codes"].items() if code != 0]
    return problems


def main() -> int:
    tx_rate = float(os.environ.get("BENCH_TX_RATE", "20"))
    seconds = float(os.environ.get("BENCH_SECONDS", "20"))
    migrate_database(log)
    gateways = ensure_gateways(int(os.environ.get("BENCH_GATEWAYS", "20")))
    endpoint_rate = float(os.environ.get("BENCH_ENDPOINT_RATE", "1000"))
    endpoints = ensure_bench_devices(
        BenchSettings(
            rate=endpoint_rate,
            seconds=seconds,
            mode="endpoint",
            devices=int(os.environ.get("BENCH_ENDPOINT_DEVICES", "1000")),
            ingesters=1,
            sim_processes=1,
            private_nats=True,
        ),
        log,
    )
    concurrency = os.environ.get("BENCH_WORKER_CONCURRENCY", "2")
    beacon_metrics = int(os.environ.get("BENCH_BEACON_METRICS", "1"))
    run_id = f"c{time.strftime('%m%d%H%M%S')}{uuid.uuid4().hex[:4]}"
    log_dir = Path(settings.BASE_DIR) / ".run" / "chunk-bench" / run_id
    log_dir.mkdir(parents=True, exist_ok=True)
    broker = start_mosquitto(workdir=log_dir / "mosquitto")
    nats = start_nats(workdir=log_dir / "nats")
    servers = [broker, nats]
    celery_url = os.environ.get("BENCH_CELERY_BROKER_URL", "")
    if not celery_url:
        # A Redis of its own for the worker's queue: a database number on the shared Redis is
        # shared with every other run using it (another database's worker would take the tasks).
        celery_redis = start_redis(workdir=log_dir / "redis")
        servers.append(celery_redis)
        celery_url = celery_redis.url
    env = dict(os.environ)
    env.update(
        MQTT_URL=broker.url,
        NATS_URL=nats.url,
        CELERY_BROKER_URL=celery_url,
        ARGUS_BRIDGE_CLIENT_ID=f"argus-chunk-bench-{run_id}",
        ARGUS_BRIDGE_SHARE_GROUP="",
        ARGUS_BRIDGE_METRICS_PORT="0",
        ARGUS_INGEST_METRICS_PORT="0",
        ARGUS_CELERY_METRICS_PORT="0",
        # The benchmarks measure capacity: a few simulated devices carry the whole load, far over
        # the per-device rate limit a real device has (BENCH_DEVICE_RATE sets one; default: none).
        ARGUS_BRIDGE_DEVICE_RATE=os.environ.get("BENCH_DEVICE_RATE", "0"),
    )
    pipeline = start_pipeline(env, int(os.environ.get("BENCH_INGESTERS", "1")), log_dir)
    with (log_dir / "celery-worker.log").open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "argus", "worker", "-c", concurrency, "-l", "INFO", *WORKER_FLAGS],
            cwd=settings.BASE_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    log(f"run {run_id}: logs in {log_dir}")
    chunks = chunk_count(BEACONS, CHUNK_SIZE)

    def config(prefix: str, **overrides: Any) -> SimulatorConfig:
        values: dict[str, Any] = {
            "devices": gateways,
            "mqtt_url": broker.url,
            "mode": "gateway_chunked",
            "beacons": BEACONS,
            "chunk_size": CHUNK_SIZE,
            "msg_id_prefix": prefix,
            "client_id_prefix": f"argus-chunk-bench-{run_id}",
            "lean": True,
            "child_metrics": beacon_metrics,
        }
        values.update(overrides)
        return SimulatorConfig(**values)

    try:
        # Warm-up: one transaction per gateway registers its 2000 beacons; repeat until the
        # bridge has subscribed (earlier messages are dropped by the broker).
        for attempt in range(30):
            prefix = f"{run_id}-W{attempt}-"
            run_simulation(config(prefix, messages=chunks * len(gateways)))
            rows = wait_done(prefix, len(gateways), 60 if attempt else 10)
            if rows and sum(r[0] == "complete" for r in rows) == len(gateways):
                break
        else:
            raise RuntimeError("warm-up transactions did not complete")
        if endpoint_rate > 0:
            run_simulation(config(f"{run_id}-EW-", devices=endpoints, mode="endpoint", messages=len(endpoints)))
        vacuum_churned_tables()
        log(
            f"warm; offering {tx_rate:g} transactions/s ({tx_rate * chunks:g} msgs/s) and {endpoint_rate:g} "
            f"endpoint msgs/s for {seconds:g} s"
        )
        base_id = max_raw_id()
        sampler = ProcSampler(
            {
                **pipeline_pids(pipeline),
                "worker": [worker.pid, *child_pids(worker.pid)],
                "mosquitto": [broker.pid],
                "nats": [nats.pid],
                "load_generator": [os.getpid()],  # this process: both simulators and the sampler
            }
        )
        endpoint_result: list[SimulatorResult] = []
        endpoint_load = threading.Thread(
            target=lambda: endpoint_result.append(
                run_simulation(
                    config(
                        f"{run_id}-E-",
                        devices=endpoints,
                        mode="endpoint",
                        rate=endpoint_rate,
                        seconds=seconds,
                        # Its own MQTT client ids: a second connection under the same id takes over the first.
                        client_id_prefix=f"argus-chunk-bench-{run_id}-endpoints",
                    )
                )
            ),
            daemon=True,
        )
        sampler.mark_start()
        postgres_start = postgres_cpu_seconds()
        activity_start = postgres_activity()
        if endpoint_rate > 0:
            endpoint_load.start()
        prefix = f"{run_id}-L"
        result = run_simulation(
            config(prefix, rate=tx_rate * chunks, seconds=seconds, processes=2 if tx_rate * chunks > 1500 else 1)
        )
        sampler.mark_end()
        window = sampler.ended_at - sampler.started_at
        postgres_cores = (postgres_cpu_seconds() - postgres_start) / window
        activity = postgres_activity().since(activity_start, window)
        log(result.summary_line())
        if endpoint_rate > 0:
            endpoint_load.join()
            log(endpoint_result[0].summary_line())
        sent_tx = -(-result.sent // chunks)
        rows = wait_done(prefix, sent_tx, 120)
        endpoint_drained = wait_stored(base_id, f"{run_id}-E-", endpoint_result[0].sent) if endpoint_result else True
        latencies = sorted(r[1] for r in rows if r[0] == "complete" and r[1] is not None)
        statuses: dict[str, int] = {}
        for r in rows:
            statuses[r[0]] = statuses.get(r[0], 0) + 1
        report = {
            "offered_tx_per_s": tx_rate,
            "achieved_msgs_per_s": round(result.achieved_rate, 1),
            "transactions_sent": sent_tx,
            "transactions": statuses,
            "readings": sum(r[3] for r in rows),
            "readings_expected": sent_tx * BEACONS * beacon_metrics,
            "chunks_sent": result.sent,
            "chunks_acked_by_broker": result.acked,
            "sim_errors": result.errors,
            "p50_last_chunk_to_complete_ms": round(percentile(latencies, 0.5), 1),
            "p99_last_chunk_to_complete_ms": round(percentile(latencies, 0.99), 1),
            "max_last_chunk_to_complete_ms": round(latencies[-1], 1) if latencies else None,
            "worker_concurrency": int(concurrency),
            **endpoint_report(
                base_id, f"{run_id}-E-", endpoint_result[0] if endpoint_result else None, endpoint_drained
            ),
            **{f"cpu_cores_{name}": round(sampler.cores(name), 2) for name in sampler.groups},
            "cpu_cores_postgres": round(postgres_cores, 2),
            "cpu_cores_machine": round(sampler.machine_cores(), 2),
            **activity,
            **postgres_server_settings(),
        }
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            exit_codes: dict[str, int | None] = {"celery-worker": worker.wait(60)}
        except subprocess.TimeoutExpired:
            worker.kill()
            exit_codes = {"celery-worker": None}
        exit_codes.update(stop_pipeline(pipeline))
        for server in servers:
            server.stop()
    report["exit_codes"] = exit_codes
    problems = failures(report)
    for problem in problems:
        log(f"FAILED: {problem}")
    # The JSON object is the last line: scripts read it with `tail -n 1`.
    print(json.dumps(report), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
