"""History read benchmark (issue 12): the read API's selectors against a `telemetry_history` of
50 million readings.

    DEBUG=1 .venv/bin/python -m devtools.history_bench      (make history-bench)

Tenant `historybench` (its own schema, so no other bench's rows are mixed in) gets 1,000 devices
of one type declaring 3 metrics, and its `telemetry_history` is filled to HISTORY_BENCH_ROWS
readings: one reading a minute of each device-metric, ending at the current minute, reaching
back as many days as that takes (12 days for 50 M). The daily partitions are created with
telemetry_history_ensure_partitions; each day is one INSERT ... SELECT generate_series straight
into its partition, in primary-key order (so the index grows at its right edge), then the table
is VACUUMed (visibility map: index-only scans) and ANALYZEd. When the table already holds the
target the fill is skipped, so a rerun only measures (a table holding a different count is
emptied and refilled). The filled database is left in place.

Measured through Django's connection, as the API calls them, each call timed with
time.perf_counter after a warm-up: history_buckets (24 h at 1 minute, 7 d at 1 hour),
history_points (a page of 1,000 of the last 24 h), latest_readings (all 1,000 devices x 3
metrics in one call) and metrics_of_device; random device-metrics (seeded). Each selector's
query is also run once under EXPLAIN (ANALYZE, BUFFERS) and the plan printed. The last line is
one JSON object.

Environment: HISTORY_BENCH_ROWS (50_000_000), HISTORY_BENCH_DEVICES (1000), HISTORY_BENCH_RUNS
(300: history_buckets, history_points and metrics_of_device; latest_readings runs a sixth as
often, at least 10), HISTORY_BENCH_FILL_JOBS (days filled at once, each on its own connection;
2), HISTORY_BENCH_PLANS (1: print the plans; 0: only their timings), HISTORY_BENCH_REFILL (0; 1:
empty and refill the table even when it holds the target, e.g. to time the fill again),
HISTORY_BENCH_GC_FREEZE (1: gc.freeze() the start-up objects before measuring, as argus.runner's
processes do; 0: measure with the full collections that walk them, about one call in a hundred).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "argus.settings")
django.setup()

from django.db import connection, transaction  # noqa: E402
from django_tenants.utils import schema_context  # noqa: E402

from argus.runner import freeze_startup_objects  # noqa: E402
from devices.models import Device, DeviceRole, DeviceType, ProcessingMode  # noqa: E402
from devtools.bench import create_missing_devices, ensure_tenant, machine_description, migrate_database  # noqa: E402
from devtools.measure import percentile  # noqa: E402
from telemetry import selectors  # noqa: E402

SCHEMA = "historybench"
TYPE_NAME = "History Bench Sensor"
METRICS = ("battery", "humidity", "temperature")  # sorted: the key's order
ID_PREFIX = "HB-"
WARM_UP_RUNS = 30


def log(msg: str) -> None:
    print(f"[history-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class HistoryBenchSettings:
    rows: int
    devices: int
    runs: int
    fill_jobs: int
    plans: bool
    refill: bool
    gc_freeze: bool

    @classmethod
    def from_env(cls) -> HistoryBenchSettings:
        env = os.environ
        return cls(
            rows=int((env.get("HISTORY_BENCH_ROWS") or "50_000_000").replace("_", "")),
            devices=int(env.get("HISTORY_BENCH_DEVICES") or 1000),
            runs=int(env.get("HISTORY_BENCH_RUNS") or 300),
            fill_jobs=max(1, int(env.get("HISTORY_BENCH_FILL_JOBS") or 2)),
            plans=(env.get("HISTORY_BENCH_PLANS") or "1").lower() in ("1", "true", "yes", "on"),
            refill=(env.get("HISTORY_BENCH_REFILL") or "0").lower() in ("1", "true", "yes", "on"),
            gc_freeze=(env.get("HISTORY_BENCH_GC_FREEZE") or "1").lower() in ("1", "true", "yes", "on"),
        )

    @property
    def minutes(self) -> int:
        """Readings per device-metric: one a minute, enough for `rows` in all."""
        return math.ceil(self.rows / (self.devices * len(METRICS)))


# --------------------------------------------------------------------------- tenant and devices


def ensure_devices(count: int) -> list[int]:
    """The tenant's bench devices (created once), their ids in key order."""
    ensure_tenant(SCHEMA, "History benchmark", log)
    ids = [f"{ID_PREFIX}{i:05d}" for i in range(count)]
    with schema_context(SCHEMA), transaction.atomic():
        device_type = DeviceType.objects.filter(name=TYPE_NAME).first()
        if device_type is None:
            device_type = DeviceType(
                name=TYPE_NAME,
                description="Created by devtools.history_bench",
                processing_mode=ProcessingMode.ENDPOINT,
                metrics=list(METRICS),
                message_schema={
                    "type": "object",
                    "required": ["values"],
                    "properties": {"values": {"type": "object", "additionalProperties": {"type": "number"}}},
                },
            )
            device_type.full_clean()
            device_type.save()
        created = create_missing_devices(device_type, ids, role=DeviceRole.STANDALONE, name="history bench")
        if created:
            log(f"created {len(created)} devices in tenant {SCHEMA!r}")
        return sorted(Device.objects.filter(logical_identifier__in=ids).values_list("id", flat=True))


# --------------------------------------------------------------------------- fill


def history_rows() -> int:
    with schema_context(SCHEMA), connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM telemetry_history")
        row = cursor.fetchone()
        return int(row[0]) if row else 0


def history_size() -> dict[str, int]:
    """Bytes of every partition's heap and indexes."""
    with schema_context(SCHEMA), connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT count(*), coalesce(sum(pg_relation_size(i.inhrelid)), 0),
                   coalesce(sum(pg_indexes_size(i.inhrelid)), 0)
            FROM pg_inherits i WHERE i.inhparent = 'telemetry_history'::regclass
            """
        )
        partitions, heap, indexes = cursor.fetchone() or (0, 0, 0)
        return {"partitions": int(partitions), "heap_bytes": int(heap), "index_bytes": int(indexes)}


# Values: a daily cycle with a per-device phase, plus noise (the sum of three uniforms, roughly
# normal); the battery drains slowly with a little jitter.
FILL_SQL = """
INSERT INTO {partition} (time, device_id, metric, value, raw_id)
SELECT t.time, d.id, m.metric,
       CASE m.metric
         WHEN 'temperature' THEN 21 + 4 * sin(2 * pi() * (extract(epoch FROM t.time) / 86400 + d.phase))
                                 + 0.4 * (random() + random() + random() - 1.5)
         WHEN 'humidity' THEN 55 - 12 * sin(2 * pi() * (extract(epoch FROM t.time) / 86400 + d.phase))
                              + 1.5 * (random() + random() + random() - 1.5)
         ELSE greatest(0, 100 - extract(epoch FROM t.time - %(start)s::timestamptz) / 86400 * (0.5 + d.phase)
                          + 0.05 * random())
       END,
       0
FROM (SELECT id, (id %% 97) / 97.0 AS phase FROM unnest(%(devices)s::bigint[]) AS id) d
CROSS JOIN unnest(%(metrics)s::text[]) AS m(metric)
CROSS JOIN generate_series(%(first)s::timestamptz, %(last)s::timestamptz, interval '1 minute') AS t(time)
ORDER BY d.id, m.metric, t.time
"""


def fill(config: HistoryBenchSettings, devices: list[int], end: datetime) -> float:
    """Fill the table with one reading a minute of every device-metric in (end - minutes, end];
    return the seconds it took."""
    first = end - timedelta(minutes=config.minutes - 1)
    first_day, last_day = first.date(), end.date()
    days = [first_day + timedelta(days=i) for i in range((last_day - first_day).days + 1)]
    with schema_context(SCHEMA), connection.cursor() as cursor:
        cursor.execute("TRUNCATE telemetry_history")
        cursor.execute("SELECT telemetry_history_ensure_partitions(%s, %s)", [first_day, len(days)])
    log(
        f"filling {config.devices} devices x {len(METRICS)} metrics x {config.minutes} minutes "
        f"({config.devices * len(METRICS) * config.minutes:,} rows) from {first:%Y-%m-%d %H:%M} to "
        f"{end:%Y-%m-%d %H:%M} UTC, {len(days)} daily partitions, {config.fill_jobs} at once"
    )
    started = time.perf_counter()
    done = threading.Lock()
    filled = [0]

    def fill_day(day: date) -> None:
        day_start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        low = max(first, day_start)
        high = min(end, day_start + timedelta(days=1) - timedelta(minutes=1))
        partition = f'"{SCHEMA}"."telemetry_history_p{day:%Y%m%d}"'
        day_started = time.perf_counter()
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SET LOCAL work_mem = '512MB'")
                cursor.execute("SET LOCAL synchronous_commit = off")
                cursor.execute(
                    FILL_SQL.format(partition=partition),
                    {"devices": devices, "metrics": list(METRICS), "first": low, "last": high, "start": first},
                )
                rows = cursor.rowcount
        finally:
            connection.close()
        with done:
            filled[0] += rows
            log(
                f"  {day}: {rows:,} rows in {time.perf_counter() - day_started:.1f} s "
                f"({filled[0]:,} in {time.perf_counter() - started:.0f} s)"
            )

    with ThreadPoolExecutor(max_workers=config.fill_jobs) as pool:
        for future in [pool.submit(fill_day, day) for day in days]:
            future.result()
    inserted = time.perf_counter() - started
    log(f"inserted {filled[0]:,} rows in {inserted:.1f} s ({filled[0] / inserted:,.0f} rows/s); VACUUM ANALYZE")
    vacuum_started = time.perf_counter()
    with schema_context(SCHEMA), connection.cursor() as cursor:
        cursor.execute("SET maintenance_work_mem = '1GB'")
        cursor.execute("VACUUM (ANALYZE) telemetry_history")
        # The bench devices were last heard at the end of their history, as ingest would leave them.
        cursor.execute("UPDATE devices SET last_seen = %s WHERE id = ANY(%s)", [end, devices])
    vacuum = time.perf_counter() - vacuum_started
    total = time.perf_counter() - started
    log(f"VACUUM ANALYZE took {vacuum:.1f} s; fill total {total:.1f} s")
    return total


def history_end() -> datetime | None:
    """The newest reading's time (the fill's end: the measured windows end there)."""
    with schema_context(SCHEMA), connection.cursor() as cursor:
        cursor.execute("SELECT max(last_seen) FROM devices WHERE logical_identifier LIKE %s", [f"{ID_PREFIX}%"])
        row = cursor.fetchone()
        if row and row[0] is not None:
            return row[0]
        cursor.execute("SELECT max(time) FROM telemetry_history")
        row = cursor.fetchone()
        return row[0] if row else None


# --------------------------------------------------------------------------- measure


@dataclass
class Timing:
    name: str
    ms: list[float]

    def summary(self) -> dict[str, float | int]:
        ms = sorted(self.ms)
        return {
            "runs": len(ms),
            "p50_ms": round(percentile(ms, 0.50), 2),
            "p95_ms": round(percentile(ms, 0.95), 2),
            "p99_ms": round(percentile(ms, 0.99), 2),
            "max_ms": round(ms[-1], 2) if ms else 0.0,
        }


@contextmanager
def explained(plans: list[tuple[str, list[Any], str]]) -> Iterator[None]:
    """While active, every query on Django's connection is first run under EXPLAIN (ANALYZE,
    BUFFERS) with the same parameters (the plan appended to `plans`), then for real."""

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
        if sql.lstrip().upper().startswith(("SELECT", "WITH")):  # not django-tenants' SET search_path
            cursor = context["cursor"].cursor  # the driver's own: Django's would call this wrapper again
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
            plans.append((sql, params, "\n".join(row[0] for row in cursor.fetchall())))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        yield


def execution_ms(plan: str) -> float:
    for line in reversed(plan.splitlines()):
        if line.strip().startswith("Execution Time:"):
            return float(line.split(":")[1].split()[0])
    return 0.0


def timed(name: str, runs: int, call: Callable[[int], object]) -> Timing:
    for i in range(min(WARM_UP_RUNS, runs)):
        call(-1 - i)
    ms = []
    for i in range(runs):
        started = time.perf_counter()
        call(i)
        ms.append((time.perf_counter() - started) * 1000)
    return Timing(name, ms)


def measure(config: HistoryBenchSettings, devices: list[int], end: datetime) -> dict[str, Any]:
    """Time each selector (random device-metrics, seeded) and EXPLAIN each once."""
    rng = random.Random(12)  # noqa: S311 (benchmark picks, not secrets)
    # The windows end just after the newest reading (an API call's "now").
    until = end + timedelta(seconds=1)
    day, week = until - timedelta(hours=24), until - timedelta(days=7)
    picks = [(rng.choice(devices), rng.choice(METRICS)) for _ in range(config.runs + WARM_UP_RUNS)]
    everything = {device: set(METRICS) for device in devices}
    checks: dict[str, Any] = {}

    def buckets_24h(i: int) -> object:
        device, metric = picks[i]
        return selectors.history_buckets(
            device_id=device, metric=metric, start=day, end=until, bucket=timedelta(minutes=1)
        )

    def buckets_7d(i: int) -> object:
        device, metric = picks[i]
        return selectors.history_buckets(
            device_id=device, metric=metric, start=week, end=until, bucket=timedelta(hours=1)
        )

    def points_page(i: int) -> object:
        device, metric = picks[i]
        return selectors.history_points(device_id=device, metric=metric, start=day, end=until, limit=1000)

    def latest(i: int) -> object:
        return selectors.latest_readings(everything)

    def metrics_of(i: int) -> object:
        return selectors.metrics_of_device(picks[i][0])

    cases: list[tuple[str, int, Callable[[int], object]]] = [
        ("history_buckets 24h/1min", config.runs, buckets_24h),
        ("history_buckets 7d/1h", config.runs, buckets_7d),
        ("history_points 24h page of 1000", config.runs, points_page),
        (f"latest_readings {len(devices)} devices x {len(METRICS)}", max(10, config.runs // 6), latest),
        ("metrics_of_device", config.runs, metrics_of),
    ]
    timings: list[Timing] = []
    plans: dict[str, str] = {}
    with schema_context(SCHEMA):
        for name, runs, call in cases:
            log(f"timing {name}: {runs} runs after {min(WARM_UP_RUNS, runs)} warm-up calls")
            timings.append(timed(name, runs, call))
            captured: list[tuple[str, list[Any], str]] = []
            with explained(captured):
                result = call(0)
            plans[name] = "\n\n".join(plan for _, _, plan in captured)
            checks[name] = len(result) if isinstance(result, list | dict) else result
        # Sanity: what the selectors returned for one device-metric.
        latest_all = selectors.latest_readings(everything)
        checks["latest_pairs"] = sum(len(v) for v in latest_all.values())
        checks["latest_newest"] = max(t for v in latest_all.values() for t, _ in v.values()).isoformat()
    rows = history_rows()
    size = history_size()
    report: dict[str, Any] = {
        "rows": rows,
        "heap_mb": round(size["heap_bytes"] / 1024**2, 1),
        "index_mb": round(size["index_bytes"] / 1024**2, 1),
        "partitions": size["partitions"],
        "data_end": end.isoformat(),
        "results": {t.name: t.summary() for t in timings},
        "plan_execution_ms": {name: execution_ms(plan) for name, plan in plans.items()},
        "returned": checks,
    }
    for name, plan in plans.items():
        if config.plans:
            log(f"EXPLAIN (ANALYZE, BUFFERS) of {name}:\n{plan}")
    return report


def human_summary(report: dict[str, Any]) -> str:
    lines = [
        f"Argus history bench on {report['machine']}: {report['rows']:,} rows in telemetry_history "
        f"({report['partitions']} partitions, heap {report['heap_mb']:,} MB, indexes {report['index_mb']:,} MB), "
        f"fill {report['fill_seconds']} s, gc frozen {report['gc_frozen']}, "
        f"load average {report['load_average'][0]} -> {report['load_average'][1]}",
    ]
    for name, s in report["results"].items():
        lines.append(
            f"  {name:<38} p50 {s['p50_ms']:>7} ms  p95 {s['p95_ms']:>7} ms  p99 {s['p99_ms']:>7} ms  "
            f"max {s['max_ms']:>7} ms  ({s['runs']} runs; EXPLAIN ANALYZE {report['plan_execution_ms'][name]} ms; "
            f"returned {report['returned'][name]})"
        )
    return "\n".join(lines)


def failures(report: dict[str, Any]) -> list[str]:
    """Why the run counts as failed (empty: passed): the table does not hold what was filled, a
    selector returned nothing, or latest values are missing for some device-metric."""
    problems = []
    if report["rows"] != report["rows_expected"]:
        problems.append(f"rows={report['rows']} of {report['rows_expected']}")
    returned = report["returned"]
    problems += [f"{name} returned nothing" for name in report["results"] if not returned.get(name)]
    pairs = report["devices"] * report["metrics"]
    if returned.get("latest_pairs") != pairs:
        problems.append(f"latest_pairs={returned.get('latest_pairs')} of {pairs}")
    return problems


def main() -> int:
    config = HistoryBenchSettings.from_env()
    migrate_database(log)
    devices = ensure_devices(config.devices)
    expected = config.devices * len(METRICS) * config.minutes
    present = history_rows()
    end = history_end()
    fill_seconds: float | None = None
    if present == expected and end is not None and not config.refill:
        log(f"telemetry_history of {SCHEMA!r} already holds {present:,} rows: not refilling")
    else:
        if present:
            why = "HISTORY_BENCH_REFILL is set" if config.refill else f"not {expected:,}"
            log(f"telemetry_history of {SCHEMA!r} holds {present:,} rows ({why}): emptying it")
        end = datetime.now(UTC).replace(second=0, microsecond=0)
        fill_seconds = round(fill(config, devices, end), 1)
    assert end is not None
    if config.gc_freeze:
        # As argus.runner's long-running processes do: otherwise about one latest_readings call in
        # a hundred (3,000 tuples) sets off a full collection that walks every object Django
        # loaded, ~70 ms on this machine, and that pause, not the query, is the p99.
        freeze_startup_objects()
    load_before = os.getloadavg()[0]
    report = measure(config, devices, end)
    report.update(
        fill_seconds=fill_seconds,
        rows_expected=expected,
        devices=len(devices),
        metrics=len(METRICS),
        machine=machine_description(),
        # The 1-minute load average before and after measuring: other work on the same cores.
        load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)],
        gc_frozen=config.gc_freeze,
    )
    print(human_summary(report), flush=True)
    problems = failures(report)
    for problem in problems:
        log(f"FAILED: {problem}")
    # The JSON object is the last line: scripts read it with `tail -n 1`.
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
