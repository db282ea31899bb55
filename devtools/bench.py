"""End-to-end benchmark: simulator -> private Mosquitto -> runbridge -> JetStream -> runingest -> PostgreSQL.

`manage.py bench` (and `make bench`) runs it. Everything is measured on this run's own
messages only: their msg_ids start with a run id, and the database is asked about rows newer
than the highest telemetry_raw id seen before the run. After the load it waits for the drain as
long as rows keep being stored (`drain_seconds`, `drain_complete`), and it reads the broker's
$SYS counters itself: messages the broker dropped (`broker_dropped`, a session queue full) are
reported apart from what the pipeline lost (`pipeline_lost`); `lost` counts both.

Then, in the same invocation and back to back, the same load from the same generator goes
through a bare chain of the same parts (devtools/baseline.py): `baseline_msgs_per_s` and
`ratio_to_baseline`. For both it samples the CPU of every process of the chain (bridge, ingest,
Mosquitto, NATS, the PostgreSQL backends of its connections; the load generator and PostgreSQL's
background processes beside them) and reports the cost per 1,000 stored messages
(`pipeline_core_ms_per_1k_msgs`, `baseline_core_ms_per_1k_msgs`). `Bench` is the pipeline,
`BaselineChain` the bare chain, `BenchRun` runs both; `failures()` is the verdict.

Environment: BENCH_RATE (msgs/s, 0 = flat out; 5000), BENCH_SECONDS (30), BENCH_MODE
(endpoint | gateway; gateway messages carry 50 children), BENCH_DEVICES (1000 endpoint devices or
20 gateways), BENCH_INGESTERS (runingest copies; 1), BENCH_SIM_PROCESSES (simulator processes;
1 up to 20000 msgs/s, else 2), BENCH_PRIVATE_NATS (1, the default: a private nats-server instead
of NATS_URL, so no other consumer of the shared `ingest` durable can take this run's messages),
BENCH_LEAN_PUBLISHER (1, the default: the simulator's hand-rolled MQTT publisher; 0: paho, which
costs about 75 us of CPU per message on this machine kind), BENCH_LIVE_PAGES (0; N: the ASGI
server and N open dashboard pages of the tenant during the load, with a probe device timed from
its MQTT publish to every page: devtools/live_pages.py), BENCH_BASELINE (empty: both chains;
1: only the bare chain; 0: only the pipeline), BENCH_CELERY_BROKER_URL (default: a private
redis-server for the tasks runingest queues), BENCH_SIM_NICE (how much the simulator worker
processes lower their CPU priority; 10 flat out, else 0), BENCH_PROFILE (1: py-spy samples
runbridge and each runingest during the load; devtools/profile.py).
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django_tenants.utils import schema_context
from paho.mqtt.enums import CallbackAPIVersion

from argus.models import Domain, Organization
from argus.registry import registry_sync
from devices.models import Device, DeviceRole, DeviceType, ProcessingMode
from devtools.baseline import BaselineChain
from devtools.live_pages import LivePages
from devtools.measure import (
    DRAIN_IDLE_SECONDS,
    PidSource,
    ProcSampler,
    cost_report,
    like_prefix,
    percentile,
    postgres_pids,
    sustained_rate,
)
from devtools.profile import Profiles
from devtools.services import ServerHandle, postgres_settings, start_mosquitto, start_nats, start_redis
from devtools.simulator import CHILD_METRICS, ENDPOINT_METRICS, SimulatorConfig, SimulatorResult, run_simulation
from devtools.supervisor import ChildError, Supervisor, manage

SCHEMA = "bench"
ENDPOINT_TYPE = "Bench Endpoint"
GATEWAY_TYPE = "Bench Gateway"
GATEWAY_CHILDREN = 50
READY_TIMEOUT = 90.0  # Django start-up of two processes on a busy 2-core machine
# Mosquitto republishes its $SYS counters every sys_interval (10 s by default).
BROKER_STAT_WAIT = 12.0
STOP_TIMEOUT = 60.0
SIM_NICE_FLAT_OUT = 10


class Writer(Protocol):
    """Where progress goes (a text stream or a management command's stdout)."""

    def write(self, msg: str) -> Any: ...

    def flush(self) -> None: ...


class BenchError(ChildError):
    """The benchmark could not set up, start or observe the pipeline."""


@dataclass(frozen=True)
class BenchSettings:
    """The load to offer, from BENCH_* environment variables."""

    rate: float
    seconds: float
    mode: str
    devices: int
    ingesters: int
    sim_processes: int
    private_nats: bool
    live_pages: int = 0
    # BENCH_BASELINE: "" (both chains, back to back), "1" (only the bare chain), "0" (only the pipeline).
    baseline: str = ""
    # BENCH_SIM_NICE: how much the simulator worker processes lower their CPU priority.
    sim_nice: int = 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> BenchSettings:
        env = dict(os.environ if environ is None else environ)
        mode = env.get("BENCH_MODE", "endpoint") or "endpoint"
        if mode not in ("endpoint", "gateway"):
            raise BenchError("BENCH_MODE must be endpoint or gateway")
        rate = float(env.get("BENCH_RATE", "5000") or 5000)
        devices = int(env.get("BENCH_DEVICES", "") or (1000 if mode == "endpoint" else 20))
        default_procs = 1 if 0 < rate <= 20000 else 2
        return cls(
            rate=rate,
            seconds=float(env.get("BENCH_SECONDS", "30") or 30),
            mode=mode,
            devices=devices,
            ingesters=int(env.get("BENCH_INGESTERS", "1") or 1),
            sim_processes=int(env.get("BENCH_SIM_PROCESSES", "") or default_procs),
            private_nats=env.get("BENCH_PRIVATE_NATS", "1").lower() in ("1", "true", "yes", "on"),
            live_pages=int(env.get("BENCH_LIVE_PAGES", "0") or 0),
            baseline=_baseline_choice(env.get("BENCH_BASELINE", "")),
            # Flat out, two simulator processes would take as much CPU as they can get, and the
            # pipeline measured less than it does alone (BENCHMARKS.md, "Overload").
            sim_nice=int(env.get("BENCH_SIM_NICE", "") or (SIM_NICE_FLAT_OUT if rate == 0 else 0)),
        )

    @property
    def runs_pipeline(self) -> bool:
        return self.baseline != "1"

    @property
    def runs_baseline(self) -> bool:
        return self.baseline != "0"

    @property
    def readings_per_message(self) -> int:
        return len(ENDPOINT_METRICS) if self.mode == "endpoint" else GATEWAY_CHILDREN * len(CHILD_METRICS)


def _baseline_choice(value: str) -> str:
    value = value.strip().lower()
    choice = {"": "", "1": "1", "true": "1", "yes": "1", "only": "1", "0": "0", "false": "0", "no": "0"}.get(value)
    if choice is None:
        raise BenchError("BENCH_BASELINE must be 1 (only the bare chain), 0 (only the pipeline) or empty (both)")
    return choice


# --------------------------------------------------------------------------- tenant and devices


def migrate_database(log: Callable[[str], None]) -> None:
    """Bring the public schema and every tenant's up to date, as `make demo` does (a no-op when they are)."""
    log("migrating the database (public and every tenant schema)")
    call_command("migrate_schemas", interactive=False, verbosity=0)


def ensure_tenant(schema: str, name: str, log: Callable[[str], None]) -> Organization:
    """The tool's own tenant, with its domain `<schema>.localhost` (created once: that migrates its
    schema, which takes a while)."""
    tenant = Organization.objects.filter(schema_name=schema).first()
    if tenant is None:
        log(f"creating tenant {schema!r} (migrates its schema, takes a while once)")
        tenant = Organization.objects.create(schema_name=schema, name=name)
    Domain.objects.get_or_create(domain=f"{schema}.localhost", defaults={"tenant": tenant, "is_primary": True})
    return tenant


def ensure_bench_devices(bench: BenchSettings, log: Callable[[str], None]) -> list[str]:
    """Create (idempotently) tenant `bench`, its device types and devices; return their logical ids."""
    ensure_tenant(SCHEMA, "Benchmark", log)
    ids = bench_device_ids(bench)
    with schema_context(SCHEMA), transaction.atomic():
        device_type = _device_type(bench.mode)
        role = DeviceRole.STANDALONE if bench.mode == "endpoint" else DeviceRole.GATEWAY
        created = create_missing_devices(device_type, ids, role=role)
        if created:
            log(f"created {len(created)} {bench.mode} devices in tenant 'bench'")
    return ids


def create_missing_devices(
    device_type: DeviceType, ids: Sequence[str], *, role: str, name: str = "bench"
) -> list[Device]:
    """Create those of the logical ids that do not exist yet in the current schema, of the type,
    named "<name> <id>"; return the ones it created."""
    existing = set(Device.objects.filter(logical_identifier__in=ids).values_list("logical_identifier", flat=True))
    missing = [i for i in ids if i not in existing]
    if not missing:
        return []
    created = Device.objects.bulk_create(
        [Device(device_type=device_type, name=f"{name} {i}", logical_identifier=i, device_role=role) for i in missing]
    )
    # bulk_create skips Device.save(): register the ids platform-wide in one statement.
    registry_sync(devices=created)
    return created


def ensure_device_type(name: str, message_schema: dict[str, Any], **fields: Any) -> DeviceType:
    """The tool's device type (in the current schema), created once with the fields; its message
    schema is brought up to date when the tool's has changed."""
    device_type = DeviceType.objects.filter(name=name).first()
    if device_type is None:
        device_type = DeviceType(name=name, message_schema=message_schema, **fields)
        device_type.full_clean()
        device_type.save()
    elif device_type.message_schema != message_schema:
        device_type.message_schema = message_schema
        device_type.save(update_fields=["message_schema"])
    return device_type


def bench_device_ids(bench: BenchSettings) -> list[str]:
    """The logical ids of the devices the simulator sends as."""
    prefix = "BENCH-E-" if bench.mode == "endpoint" else "BENCH-G-"
    return [f"{prefix}{i:05d}" for i in range(bench.devices)]


def _device_type(mode: str) -> DeviceType:
    if mode == "endpoint":
        values: dict[str, Any] = {
            "processing_mode": ProcessingMode.ENDPOINT,
            "metrics": list(ENDPOINT_METRICS),
            "message_schema": {
                "type": "object",
                "required": ["values"],
                "properties": {
                    "values": {
                        "type": "object",
                        "properties": {
                            "temperature": {"type": "number", "minimum": -60, "maximum": 120},
                            "humidity": {"type": "number", "minimum": 0, "maximum": 100},
                        },
                        "additionalProperties": {"type": "number"},
                    }
                },
            },
        }
        name = ENDPOINT_TYPE
    else:
        values = {
            "processing_mode": ProcessingMode.GATEWAY,
            "metrics": list(CHILD_METRICS),
            "auto_register_children": True,
            "max_children": 100,
            "message_schema": {
                "type": "object",
                "required": ["children"],
                "properties": {"children": {"type": "array", "maxItems": 100}},
            },
        }
        name = GATEWAY_TYPE
    device_type = DeviceType.objects.filter(name=name).first()
    if device_type is None:
        device_type = DeviceType(name=name, description="Created by manage.py bench", **values)
        device_type.full_clean()
        device_type.save()
    return device_type


# --------------------------------------------------------------------------- pipeline processes


def start_pipeline(env: dict[str, str], ingesters: int, log_dir: Path) -> Supervisor:
    """Start runbridge and `ingesters` runingest processes (children named `runbridge`,
    `runingest#0`, …)."""
    supervisor = Supervisor(log_dir, env)
    for i in range(ingesters):
        supervisor.add(f"runingest#{i}", manage("runingest"))
    supervisor.add("runbridge", manage("runbridge"))
    supervisor.start()
    return supervisor


def stop_pipeline(pipeline: Supervisor) -> dict[str, int | None]:
    """SIGTERM the bridge first (it drains into JetStream), then the consumers; return exit codes."""
    return pipeline.stop([["runbridge"]], STOP_TIMEOUT)


def child_pids(pid: int) -> list[int]:
    """The children of a process (a Celery worker's pool processes)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def pipeline_pids(pipeline: Supervisor) -> dict[str, list[int]]:
    """Process ids of the bridge and the consumers, for CPU and memory sampling."""
    return {
        "bridge": [pipeline.child("runbridge").pid],
        "ingest": [c.pid for c in pipeline.children if c.name.startswith("runingest")],
    }


# --------------------------------------------------------------------------- database


def max_raw_id() -> int:
    with schema_context(SCHEMA), connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(max(id), 0) FROM telemetry_raw")
        return int(cursor.fetchone()[0])


def count_stored(base_id: int, prefix: str) -> int:
    """telemetry_raw rows of messages whose msg_id starts with prefix (rows newer than base_id)."""
    with schema_context(SCHEMA), connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM telemetry_raw WHERE id > %s AND msg_id LIKE %s", [base_id, like_prefix(prefix)]
        )
        return int(cursor.fetchone()[0])


def rejected_reasons(base_id: int, prefix: str) -> list[str]:
    with schema_context(SCHEMA), connection.cursor() as cursor:
        cursor.execute(
            "SELECT reason, count(*) FROM telemetry_raw WHERE id > %s AND msg_id LIKE %s AND status <> 'accepted' "
            "GROUP BY reason ORDER BY count(*) DESC LIMIT 5",
            [base_id, like_prefix(prefix)],
        )
        return [f"{count}x {reason}" for reason, count in cursor.fetchall()]


@dataclass
class StoredRow:
    raw_id: int
    msg_id: str
    status: str
    readings: int
    stored_ms: float
    ts_ms: float | None


def stored_rows(base_id: int, prefix: str) -> list[StoredRow]:
    with schema_context(SCHEMA), connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT id, msg_id, status, readings, extract(epoch FROM stored_at) * 1000,
                   (convert_from(payload, 'UTF8')::jsonb ->> 'ts')::float8
            FROM telemetry_raw WHERE id > %s AND msg_id LIKE %s
            """,
            [base_id, like_prefix(prefix)],
        )
        return [StoredRow(r[0], r[1], r[2], r[3], float(r[4]), r[5]) for r in cursor.fetchall()]


def history_counts(raw_ids: Sequence[int], since_ms: float) -> dict[int, int]:
    """History rows per raw id (readings are stamped with the device's ts, so no older than since_ms)."""
    if not raw_ids:
        return {}
    with schema_context(SCHEMA), connection.cursor() as cursor:
        cursor.execute(
            "SELECT raw_id, count(*) FROM telemetry_history WHERE time >= to_timestamp(%s) "
            "AND raw_id BETWEEN %s AND %s GROUP BY raw_id",
            [since_ms / 1000.0, min(raw_ids), max(raw_ids)],
        )
        wanted = set(raw_ids)
        return {raw_id: count for raw_id, count in cursor.fetchall() if raw_id in wanted}


@dataclass(frozen=True)
class PostgresActivity:
    """Cumulative server-wide WAL and checkpoint counters at one moment."""

    wal_bytes: int
    wal_fpi: int
    checkpoints_timed: int
    checkpoints_requested: int

    def since(self, start: PostgresActivity, seconds: float) -> dict[str, Any]:
        """What happened between `start` and this snapshot, for a benchmark report."""
        return {
            "pg_wal_mb_per_s": round((self.wal_bytes - start.wal_bytes) / seconds / 2**20, 1),
            # Full-page images: the first change of a page after each checkpoint logs all 8 kB of it.
            "pg_wal_full_page_images_per_s": round((self.wal_fpi - start.wal_fpi) / seconds),
            "pg_checkpoints_timed": self.checkpoints_timed - start.checkpoints_timed,
            # Requested: started because max_wal_size filled up (or asked for), not by the clock.
            "pg_checkpoints_requested": self.checkpoints_requested - start.checkpoints_requested,
        }


def postgres_activity() -> PostgresActivity:
    """Snapshot of pg_stat_wal and the checkpoint counters (PostgreSQL 14+)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT wal_bytes, wal_fpi, current_setting('server_version_num')::int FROM pg_stat_wal")
        wal_bytes, wal_fpi, version = cursor.fetchone()
        if version >= 170000:  # checkpoints moved to their own view in 17
            cursor.execute("SELECT num_timed, num_requested FROM pg_stat_checkpointer")
        else:
            cursor.execute("SELECT checkpoints_timed, checkpoints_req FROM pg_stat_bgwriter")
        timed, requested = cursor.fetchone()
    return PostgresActivity(int(wal_bytes), int(wal_fpi), int(timed), int(requested))


def wal_report(start: PostgresActivity, end: PostgresActivity, stored: int) -> dict[str, Any]:
    """The server's WAL over the measured window per 1,000 stored messages (server-wide: other
    databases' writes on the same server count too)."""
    per_1k = 1000 / stored if stored else 0.0
    return {
        "pg_wal_kb_per_1k_msgs": round((end.wal_bytes - start.wal_bytes) / 1024 * per_1k, 1),
        "pg_wal_full_page_images_per_1k_msgs": round((end.wal_fpi - start.wal_fpi) * per_1k, 1),
        "pg_checkpoints": (end.checkpoints_timed - start.checkpoints_timed)
        + (end.checkpoints_requested - start.checkpoints_requested),
    }


def postgres_server_settings() -> dict[str, str]:
    """The server's values of the settings we ship (docker/postgres/argus.conf), as `pg_<name>`:
    they decide how often checkpoints come and whether the hot index pages stay in its buffers."""
    names = list(postgres_settings())
    with connection.cursor() as cursor:
        cursor.execute("SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)", [names])
        found = dict(cursor.fetchall())
    return {f"pg_{name}": found.get(name, "?") for name in names}


# --------------------------------------------------------------------------- the broker's own counters


class BrokerStats:
    """Follows the private broker's $SYS counters: messages it dropped (a session's queue full) and
    messages it stores. Drops are the broker's, not the pipeline's: reported apart from `lost`."""

    DROPPED = "$SYS/broker/publish/messages/dropped"
    STORED = "$SYS/broker/store/messages/count"
    STORED_BYTES = "$SYS/broker/store/messages/bytes"

    def __init__(self, url: str, client_id: str) -> None:
        parts = urlparse(url)
        self.values: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self.updated_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self._client.on_connect = lambda client, *_: client.subscribe(
            [(self.DROPPED, 0), (self.STORED, 0), (self.STORED_BYTES, 0)]
        )
        self._client.on_message = self._on_message
        self._client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=30)
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            value = float(message.payload)
        except ValueError:
            return
        with self._lock:
            self.values[message.topic] = value
            self.peaks[message.topic] = max(value, self.peaks.get(message.topic, value))
            self.updated_at[message.topic] = time.monotonic()

    def dropped_since(self, baseline: float, after: float) -> float | None:
        """Messages dropped since `baseline`, from a counter published after `after` (monotonic
        time; waits up to BROKER_STAT_WAIT for one); None when the broker never said."""
        deadline = time.monotonic() + BROKER_STAT_WAIT
        while time.monotonic() < deadline and self.updated_at.get(self.DROPPED, 0.0) <= after:
            time.sleep(0.2)
        value = self.values.get(self.DROPPED)
        return None if value is None else value - baseline

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


# --------------------------------------------------------------------------- the run


def machine_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} x {model}"


class Bench:
    """One benchmark run; `run()` returns the result dict (the JSON line) and writes progress to out."""

    def __init__(self, bench: BenchSettings, out: Writer) -> None:
        self.bench = bench
        self.out = out
        self.run_id = f"b{time.strftime('%m%d%H%M%S')}{uuid.uuid4().hex[:4]}"
        # Empty: a private Redis is started for the tasks runingest queues (start_servers).
        self.celery_url = os.environ.get("BENCH_CELERY_BROKER_URL", "")
        self.servers: list[ServerHandle] = []
        self.pipeline: Supervisor | None = None
        self.broker_stats: BrokerStats | None = None
        self.exit_codes: dict[str, int | None] = {}
        self.broker_dropped: float | None = None
        self.drain_complete = False
        self._dropped_before = 0.0
        self.live: LivePages | None = None
        self.nats: ServerHandle | None = None
        self.broker_url = ""
        self.application_name = f"argus-bench-{self.run_id}"
        # More broker configuration (the fleet bench's mTLS listener), after the shipped plain listener.
        self.broker_conf_extra = ""

    def log(self, text: str) -> None:
        self.out.write(f"bench: {text}\n")
        self.out.flush()

    def sim_config(self, devices: list[str], prefix: str, **overrides: Any) -> SimulatorConfig:
        config = SimulatorConfig(
            devices=devices,
            mqtt_url=self.broker_url,
            mode=self.bench.mode,
            children=GATEWAY_CHILDREN,
            qos=1,
            msg_id_prefix=prefix,
            client_id_prefix=f"argus-bench-sim-{self.run_id}",
            # The load generator should not be what limits the benchmark: see LeanMqttPublisher.
            lean=os.environ.get("BENCH_LEAN_PUBLISHER", "1") == "1",
            nice=self.bench.sim_nice,
        )
        for key, value in overrides.items():
            setattr(config, key, value)
        return config

    @property
    def log_dir(self) -> Path:
        return Path(settings.BASE_DIR) / ".run" / "bench" / self.run_id

    def run(self) -> dict[str, Any]:
        migrate_database(self.log)
        devices = ensure_bench_devices(self.bench, self.log)
        log_dir = self.log_dir
        env = self.start_servers(log_dir)
        base_id = max_raw_id()
        self.pipeline = start_pipeline(env, self.bench.ingesters, log_dir)
        self.warm_up(devices, base_id)

        broker = self.servers[0]
        pids: dict[str, PidSource] = {**pipeline_pids(self.pipeline), "mosquitto": [broker.pid]}
        if self.bench.live_pages:
            self.live = LivePages(
                # Not named as the pipeline's connections: the live server is not part of the chain.
                env={k: v for k, v in env.items() if k != "PGAPPNAME"},
                log_dir=log_dir,
                schema=SCHEMA,
                host=f"{SCHEMA}.localhost",
                pages=self.bench.live_pages,
                page_devices=devices,
            )
            self.live.start()
            self.live.start_probe(broker.url, self.run_id)
            pids["live"] = [self.live.server.pid, *child_pids(self.live.server.pid)]
            self.log(f"{self.bench.live_pages} dashboard pages open on the live server (port {self.live.port})")
        if self.nats is not None:
            pids["nats"] = [self.nats.pid]
        pids.update(postgres_pids(self.application_name), load_generator=[os.getpid()])
        sampler = ProcSampler(pids, reaped=["load_generator"])
        self.broker_stats = BrokerStats(broker.url, f"argus-bench-stats-{self.run_id}")
        time.sleep(0.5)  # the retained $SYS values arrive on subscribing
        dropped_before = self._dropped_before = self.broker_stats.values.get(BrokerStats.DROPPED, 0.0)
        prefix = f"{self.run_id}-L"
        rate = "flat out" if not self.bench.rate else f"{self.bench.rate:g} msgs/s"
        self.log(
            f"offering {rate} for {self.bench.seconds:g} s from {len(devices)} {self.bench.mode} devices "
            f"({self.bench.sim_processes} simulator process(es), QoS 1)"
        )
        profiles = self.profiles()
        activity_start = postgres_activity()
        sampler.mark_start()
        if profiles is not None:
            profiles.start()
        if self.live is not None:
            self.live.mark()
        result = run_simulation(self.load_config(devices, prefix))
        self.log(result.summary_line())
        if profiles is not None:
            self.log_profiles(profiles)
        if self.live is not None:
            self.live.stop_probe()
        stored = self.drain(base_id, prefix, result.sent)
        sampler.mark_end()
        activity = postgres_activity()
        live_report: dict[str, Any] = {}
        if self.live is not None:
            live_report = self.live.report()
            self.exit_codes["live"] = self.live.stop()
            self.live = None
        self.broker_dropped = self.broker_stats.dropped_since(dropped_before, time.monotonic())
        self.log(f"stored {stored} of {result.sent} messages; stopping the pipeline")
        self.exit_codes.update(stop_pipeline(self.pipeline))
        report = self.analyse(base_id, prefix, result, sampler)
        report.update(cost_report(sampler, report["stored"], "", "pipeline_core_ms_per_1k_msgs"))
        report.update(wal_report(activity_start, activity, report["stored"]))
        if live_report:
            report.update(live_report, cpu_cores_live=round(sampler.cores("live"), 2))
        return report

    def profiles(self) -> Profiles | None:
        """With BENCH_PROFILE=1: py-spy on runbridge and each runingest for the load's duration."""
        if os.environ.get("BENCH_PROFILE", "") not in ("1", "true", "yes", "on"):
            return None
        assert self.pipeline is not None
        pids = {c.name.replace("#", ""): c.pid for c in self.pipeline.children}
        return Profiles(self.log_dir, pids, self.bench.seconds or 30)

    def log_profiles(self, profiles: Profiles) -> None:
        for name, summary in profiles.finish().items():
            text = summary.text(f"profile of {name} during the load ({profiles.path(name)})")
            (self.log_dir / f"profile-{name}.md").write_text(text + "\n")
            self.log(text)

    def load_config(self, devices: list[str], prefix: str) -> SimulatorConfig:
        """The measured load: BENCH_RATE for BENCH_SECONDS from these devices."""
        return self.sim_config(
            devices, prefix, rate=self.bench.rate, seconds=self.bench.seconds, processes=self.bench.sim_processes
        )

    def start_servers(self, log_dir: Path) -> dict[str, str]:
        """Start the private Mosquitto (self.servers[0]) and, unless BENCH_PRIVATE_NATS=0, a private
        nats-server; return the environment the pipeline's processes run with."""
        log_dir.mkdir(parents=True, exist_ok=True)
        broker = start_mosquitto(conf_extra=self.broker_conf_extra, workdir=log_dir / "mosquitto")
        self.servers.append(broker)
        self.broker_url = broker.url
        if not self.celery_url:
            # The tasks runingest queues after every batch (and, in the alert bench, the worker
            # that runs them) get a Redis of their own, thrown away afterwards: a database number
            # on the shared Redis is shared with every other run (and tests) using that number.
            celery_redis = start_redis(workdir=log_dir / "redis")
            self.servers.append(celery_redis)
            self.celery_url = celery_redis.url
        env = dict(os.environ)
        env.update(
            MQTT_URL=broker.url,
            ARGUS_BRIDGE_CLIENT_ID=f"argus-bench-{self.run_id}",
            ARGUS_BRIDGE_SHARE_GROUP="",
            ARGUS_BRIDGE_METRICS_PORT="0",
            ARGUS_INGEST_METRICS_PORT="0",
            ARGUS_CELERY_METRICS_PORT="0",
            # The benchmarks measure capacity: a few simulated devices carry the whole load, far over
            # the per-device rate limit a real device has (BENCH_DEVICE_RATE sets one; default: none).
            ARGUS_BRIDGE_DEVICE_RATE=os.environ.get("BENCH_DEVICE_RATE", "0"),
            # runingest queues follow-up tasks after every batch and no worker runs here: keep them
            # out of the real queue (a backlog there delays every real task).
            CELERY_BROKER_URL=self.celery_url,
            # libpq names the pipeline's connections so that their backends can be found and sampled.
            PGAPPNAME=self.application_name,
        )
        if self.bench.private_nats:
            nats = start_nats(workdir=log_dir / "nats")
            self.servers.append(nats)
            env["NATS_URL"] = nats.url
            self.nats = nats
        self.log(
            f"run {self.run_id}: broker {broker.url}, NATS {env.get('NATS_URL', settings.NATS_URL)}, logs {log_dir}"
        )
        return env

    def warm_up(self, devices: list[str], base_id: int) -> None:
        """Wait until a probe message is stored (bridge subscribed, consumer running), then send one
        message per device so caches, children and connections are warm before measuring."""
        assert self.pipeline is not None
        started = time.monotonic()
        attempt = 0
        while True:
            self.pipeline.check_alive()
            if time.monotonic() - started > READY_TIMEOUT:
                raise BenchError(
                    f"no probe message stored within {READY_TIMEOUT:.0f} s\n"
                    + "\n".join(f"{c.name}:\n{c.tail()}" for c in self.pipeline.children)
                )
            prefix = f"{self.run_id}-P{attempt}-"
            # Before the bridge has subscribed the broker drops the probe: send it again until one lands.
            run_simulation(self.sim_config(devices[:1], prefix, messages=1, ack_timeout=5.0))
            attempt += 1
            probe_deadline = time.monotonic() + 2.0
            while time.monotonic() < probe_deadline:
                if count_stored(base_id, f"{self.run_id}-P"):
                    break
                time.sleep(0.1)
            else:
                continue
            break
        reasons = rejected_reasons(base_id, f"{self.run_id}-P")
        if reasons:
            raise BenchError(f"the pipeline rejected the probe message: {reasons}")
        self.log(f"pipeline ready after {time.monotonic() - started:.1f} s; warming up with one message per device")
        prefix = f"{self.run_id}-W"
        warm = run_simulation(self.sim_config(devices, prefix, messages=len(devices), processes=1))
        deadline = time.monotonic() + READY_TIMEOUT
        while count_stored(base_id, prefix) < warm.sent:
            self.pipeline.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"warm-up messages not all stored within {READY_TIMEOUT:.0f} s")
            time.sleep(0.2)
        reasons = rejected_reasons(base_id, prefix)
        if reasons:
            raise BenchError(f"the pipeline rejected warm-up messages: {reasons}")

    def drain(self, base_id: int, prefix: str, sent: int) -> int:
        """Wait until every sent message is stored, however long that takes while rows keep
        arriving; give up only when none has for DRAIN_IDLE_SECONDS."""
        assert self.pipeline is not None
        started = time.monotonic()
        stored, last_progress, last_log = -1, started, started
        while True:
            now_stored = count_stored(base_id, prefix)
            if now_stored != stored:
                stored, last_progress = now_stored, time.monotonic()
            if stored >= sent:
                self.drain_complete = True
                return stored
            dropped = self.broker_stats.values.get(BrokerStats.DROPPED) if self.broker_stats else None
            if dropped is not None and stored + dropped - self._dropped_before >= sent:
                # What the broker dropped never comes: everything else is stored.
                self.log(f"draining: {stored} stored, the rest dropped by the broker")
                self.drain_complete = True
                return stored
            if time.monotonic() - last_progress > DRAIN_IDLE_SECONDS:
                self.log(f"draining: nothing stored for {DRAIN_IDLE_SECONDS:.0f} s, giving up")
                return stored
            if time.monotonic() - last_log >= 30:
                last_log = time.monotonic()
                self.log(f"draining: {stored} of {sent} stored after {last_log - started:.0f} s")
            self.pipeline.check_alive()
            time.sleep(0.25)

    def analyse(self, base_id: int, prefix: str, result: SimulatorResult, sampler: ProcSampler) -> dict[str, Any]:
        expected = set(result.msg_ids())
        rows = stored_rows(base_id, prefix)
        per_message = self.bench.readings_per_message
        seen: set[str] = set()
        unexpected_raw = 0
        rejected = 0
        latencies: list[float] = []
        for row in rows:
            if row.msg_id not in expected or row.msg_id in seen:
                unexpected_raw += 1
                continue
            seen.add(row.msg_id)
            if row.status != "accepted":
                rejected += 1
            if row.ts_ms is not None:
                latencies.append(row.stored_ms - row.ts_ms)
        lost = len(expected - seen)
        accepted_ids = [r.raw_id for r in rows if r.status == "accepted"]
        counts = history_counts(accepted_ids, result.first_send * 1000 - 60_000)
        extra_history = sum(max(0, counts.get(i, 0) - per_message) for i in accepted_ids)
        missing_readings = sum(max(0, per_message - counts.get(i, 0)) for i in accepted_ids)
        stored_readings = sum(counts.values())
        latencies.sort()

        stored_times = sorted(r.stored_ms for r in rows)
        rate = sustained_rate(
            stored=len(seen),
            expected=len(expected),
            first_send=result.first_send,
            last_send=result.last_send,
            first_stored=stored_times[0] / 1000 if stored_times else 0.0,
            last_stored=stored_times[-1] / 1000 if stored_times else 0.0,
        )
        sustained, sustained_basis, kept_up = rate.msgs_per_s, rate.basis, rate.kept_up
        send_duration, drain_seconds, stored_count = result.duration, rate.drain_seconds, len(seen)
        readings_ratio = stored_readings / len(accepted_ids) if accepted_ids else 0.0

        bridge_rss, ingest_rss = sampler.rss_mb("bridge"), sampler.rss_mb("ingest")
        report: dict[str, Any] = {
            "offered_msgs_per_s": round(result.sent / send_duration, 1) if send_duration > 0 else 0.0,
            "sustained_msgs_per_s": round(sustained, 1),
            "readings_per_s": round(sustained * readings_ratio, 1),
            "p50_latency_ms": round(percentile(latencies, 0.50), 1),
            "p99_latency_ms": round(percentile(latencies, 0.99), 1),
            "max_latency_ms": round(latencies[-1], 1) if latencies else 0.0,
            "lost": lost,
            # Of those, not the broker's doing (broker_dropped below): lost between broker and database.
            "pipeline_lost": max(0, lost - int(self.broker_dropped or 0)),
            "duplicates": extra_history + unexpected_raw,
            "rejected": rejected,
            "missing_readings": missing_readings,
            "sent": result.sent,
            "acked_by_broker": result.acked,
            "sim_errors": result.errors,
            "stored": stored_count,
            "readings_stored": stored_readings,
            "send_seconds": round(send_duration, 2),
            "drain_seconds": round(drain_seconds, 2),
            "drain_complete": self.drain_complete,
            # Acknowledged to a device, then dropped by the broker (a session queue full): not the
            # pipeline's loss, but the broker configuration's (null: the broker did not say).
            "broker_dropped": None if self.broker_dropped is None else int(self.broker_dropped),
            "broker_stored_peak": int(self.broker_stats.peaks.get(BrokerStats.STORED, 0)) if self.broker_stats else 0,
            "broker_stored_mb_peak": round(self.broker_stats.peaks.get(BrokerStats.STORED_BYTES, 0) / 1024**2, 1)
            if self.broker_stats
            else 0.0,
            "kept_up": kept_up,
            "sustained_basis": sustained_basis,
            "cpu_cores_bridge": round(sampler.cores("bridge"), 2),
            "cpu_cores_ingest": round(sampler.cores("ingest"), 2),
            "cpu_cores_mosquitto": round(sampler.cores("mosquitto"), 2),
            "cpu_cores_machine": round(sampler.machine_cores(), 2),
            "rss_mb_bridge_start": bridge_rss["start"],
            "rss_mb_bridge_end": bridge_rss["end"],
            "rss_mb_bridge_peak": bridge_rss["peak"],
            "rss_mb_ingest_start": ingest_rss["start"],
            "rss_mb_ingest_end": ingest_rss["end"],
            "rss_mb_ingest_peak": ingest_rss["peak"],
            "rss_mb_mosquitto_peak": sampler.rss_mb("mosquitto")["peak"],
            "exit_codes": self.exit_codes,
            "mode": self.bench.mode,
            "rate": self.bench.rate,
            "seconds": self.bench.seconds,
            "devices": self.bench.devices,
            "ingesters": self.bench.ingesters,
            "machine": machine_description(),
            "run_id": self.run_id,
        }
        if rejected:
            report["rejected_reasons"] = rejected_reasons(base_id, prefix)
        return report

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
        if self.broker_stats is not None:
            self.broker_stats.close()
        if self.pipeline is not None:
            self.pipeline.stop([], STOP_TIMEOUT)
        for server in reversed(self.servers):
            server.stop()


class BenchRun:
    """What `manage.py bench` runs: the pipeline (`Bench`) and then the bare chain
    (`devtools.baseline.BaselineChain`) under the same load from the same generator, back to back,
    on the same private nats-server; one report with both and their ratio."""

    def __init__(self, bench: BenchSettings, out: Writer) -> None:
        self.bench = bench
        self.pipeline = Bench(bench, out)
        self.baseline: BaselineChain | None = None

    def run(self) -> dict[str, Any]:
        pipeline = self.pipeline
        report: dict[str, Any] = {}
        if self.bench.runs_pipeline:
            report = pipeline.run()
        else:
            pipeline.log_dir.mkdir(parents=True, exist_ok=True)
            nats = start_nats(workdir=pipeline.log_dir / "nats")
            pipeline.servers.append(nats)
            pipeline.nats = nats
            report = {
                "mode": self.bench.mode,
                "rate": self.bench.rate,
                "seconds": self.bench.seconds,
                "devices": self.bench.devices,
                "machine": machine_description(),
                "run_id": pipeline.run_id,
            }
        if self.bench.runs_baseline:
            nats_url = pipeline.nats.url if pipeline.nats is not None else settings.NATS_URL
            self.baseline = BaselineChain(
                run_id=pipeline.run_id, nats_url=nats_url, log_dir=pipeline.log_dir, log=pipeline.log
            )
            self.baseline.start()
            devices = bench_device_ids(self.bench)
            report.update(
                self.baseline.measure(
                    devices=devices,
                    make_config=pipeline.sim_config,
                    load=pipeline.sim_config(
                        devices,
                        "",
                        rate=self.bench.rate,
                        seconds=self.bench.seconds,
                        processes=self.bench.sim_processes,
                    ),
                    nats_pid=pipeline.nats.pid if pipeline.nats is not None else None,
                )
            )
            if self.bench.runs_pipeline and report["baseline_msgs_per_s"]:
                report["ratio_to_baseline"] = round(report["sustained_msgs_per_s"] / report["baseline_msgs_per_s"], 3)
        return report

    def close(self) -> None:
        try:
            if self.baseline is not None:
                self.baseline.close()
        finally:
            self.pipeline.close()


def failures(report: dict[str, Any]) -> list[str]:
    """Why the run counts as failed (empty: passed): anything lost, duplicated, rejected, not
    drained, not acknowledged by the broker, or nothing stored at all; the same for the bare
    chain's part of the report (`baseline_*`) when it ran."""
    keys = ("lost", "duplicates", "rejected", "missing_readings", "baseline_lost", "baseline_duplicates")
    problems = [f"{key}={report[key]}" for key in keys if report.get(key)]
    problems += chain_failures(report) + chain_failures(report, "baseline_")
    problems += [f"live_page_errors={report['live_page_errors']}"] if report.get("live_page_errors") else []
    if report.get("live_pages") and (report["live_probe_missed"] or not report["live_probe_deliveries"]):
        deliveries = report["live_probes"] * report["live_pages"]
        problems.append(f"live_probe_missed={report['live_probe_missed']} of {deliveries} deliveries")
    problems += [f"broker_dropped={report['broker_dropped']}"] if report.get("broker_dropped") else []
    exit_codes = {**report.get("exit_codes", {}), **report.get("baseline_exit_codes", {})}
    problems += [f"{name} exited with {code}" for name, code in exit_codes.items() if code != 0]
    return problems


def chain_failures(report: dict[str, Any], prefix: str = "") -> list[str]:
    """What every measured chain must do (keys `<prefix>sent`, ...): store something, drain
    completely, and have every message it was offered acknowledged by the broker without errors."""
    if f"{prefix}sent" not in report:
        return []
    problems = []
    if not report[f"{prefix}stored"]:
        problems.append(f"{prefix}stored=0")
    if not report[f"{prefix}drain_complete"]:
        problems.append(
            f"{prefix}drain_complete=False ({report[f'{prefix}stored']} of {report[f'{prefix}sent']} stored)"
        )
    if report[f"{prefix}sim_errors"]:
        problems.append(f"{prefix}sim_errors={report[f'{prefix}sim_errors']}")
    if report[f"{prefix}acked_by_broker"] < report[f"{prefix}sent"]:
        problems.append(f"{prefix}unacknowledged={report[f'{prefix}sent'] - report[f'{prefix}acked_by_broker']}")
    return problems


def pipeline_summary(report: dict[str, Any]) -> str:
    r = report
    return "\n".join(
        [
            f"Argus bench {r['run_id']} on {r['machine']}: {r['mode']}, {r['devices']} devices, "
            f"rate {r['rate'] or 'flat out'}, {r['seconds']:g} s",
            f"  offered    {r['offered_msgs_per_s']:>10,.0f} msgs/s  ({r['sent']} sent in {r['send_seconds']} s)",
            f"  sustained  {r['sustained_msgs_per_s']:>10,.0f} msgs/s  {r['readings_per_s']:,.0f} readings/s  "
            f"[{r['sustained_basis']}; drained {r['drain_seconds']} s after the last send]",
            f"  latency    p50 {r['p50_latency_ms']} ms  p99 {r['p99_latency_ms']} ms  max {r['max_latency_ms']} ms"
            "  (stored_at - device ts)",
            f"  integrity  lost {r['lost']} (pipeline {r['pipeline_lost']})  duplicates {r['duplicates']}  "
            f"rejected {r['rejected']}  "
            f"missing readings {r['missing_readings']}  dropped by the broker {r['broker_dropped']}",
            f"  cpu cores  bridge {r['cpu_cores_bridge']}  ingest {r['cpu_cores_ingest']}  "
            f"mosquitto {r['cpu_cores_mosquitto']}  whole machine {r['cpu_cores_machine']}",
            f"  rss MB     bridge {r['rss_mb_bridge_start']} -> {r['rss_mb_bridge_end']} "
            f"(peak {r['rss_mb_bridge_peak']})"
            f"  ingest {r['rss_mb_ingest_start']} -> {r['rss_mb_ingest_end']} (peak {r['rss_mb_ingest_peak']})"
            f"  mosquitto peak {r['rss_mb_mosquitto_peak']}",
            f"  broker     stored peak {r['broker_stored_peak']} messages ({r['broker_stored_mb_peak']} MB)",
            f"  exit codes {r['exit_codes']}",
        ]
        + (
            [
                f"  live       {r['live_pages']} pages: {r['live_events_per_s_per_page']} events/s per page "
                f"(max {r['live_events_per_s_per_page_max']}), {r['live_kb_per_s_per_page']} KB/s per page; "
                f"probe publish -> page p50 {r['live_latency_p50_ms']} ms p99 {r['live_latency_p99_ms']} ms "
                f"max {r['live_latency_max_ms']} ms, {r['live_probe_missed']} of "
                f"{r['live_probes'] * r['live_pages']} missed; live server {r['cpu_cores_live']} cores"
            ]
            if r.get("live_pages")
            else []
        )
    )


def cost_line(report: dict[str, Any], prefix: str, total_key: str) -> str:
    """Core-ms per 1,000 stored messages of each sampled process, and the chain's total."""
    marker = f"{prefix}core_ms_per_1k_"
    parts = [
        f"{key[len(marker) :]} {value}" for key, value in report.items() if key.startswith(marker) and key != total_key
    ]
    return f"  core-ms/1k  {'  '.join(parts)}  => chain {report[total_key]}"


def human_summary(report: dict[str, Any]) -> str:
    """The run in a few lines: the pipeline's, its cost, the bare chain's and the ratio."""
    r = report
    lines = []
    if "sustained_msgs_per_s" in r:
        lines.append(pipeline_summary(r))
        if "pipeline_core_ms_per_1k_msgs" in r:
            lines.append(cost_line(r, "", "pipeline_core_ms_per_1k_msgs"))
    if "baseline_msgs_per_s" in r:
        lines += [
            f"Bare chain (devtools/baseline.py), same load: {r['baseline_msgs_per_s']:,.0f} msgs/s "
            f"[{r['baseline_sustained_basis']}], offered {r['baseline_offered_msgs_per_s']:,.0f}",
            f"  latency    p50 {r['baseline_p50_latency_ms']} ms  p99 {r['baseline_p99_latency_ms']} ms",
            f"  integrity  lost {r['baseline_lost']}  duplicates {r['baseline_duplicates']}  "
            f"stored {r['baseline_stored']} of {r['baseline_sent']}  exit codes {r['baseline_exit_codes']}",
            cost_line(r, "baseline_", "baseline_core_ms_per_1k_msgs"),
        ]
    if "ratio_to_baseline" in r:
        lines.append(f"ratio to the bare chain: {r['ratio_to_baseline']}")
    return "\n".join(lines)


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, separators=(",", ":"), sort_keys=False)


class Runnable(Protocol):
    def run(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def run_and_report(
    bench: Runnable,
    out: Writer,
    *,
    summary: Callable[[dict[str, Any]], str],
    problems_of: Callable[[dict[str, Any]], list[str]],
) -> None:
    """What a bench command does with its run: the summary, what failed, and last one JSON line;
    SystemExit(1) when anything failed. ChildError (a process or server that would not start or
    died) becomes a CommandError."""
    try:
        report = bench.run()
    except ChildError as exc:
        raise CommandError(str(exc)) from exc
    finally:
        bench.close()
    out.write(summary(report))
    problems = problems_of(report)
    if problems:
        out.write("FAILED: " + ", ".join(problems))
    # The JSON object is the last line: scripts read it with `tail -n 1`.
    out.write(report_json(report))
    if problems:
        raise SystemExit(1)
