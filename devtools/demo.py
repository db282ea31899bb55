"""The demo behind `manage.py demo` (and `make demo`): run every process of the platform as a
child, feed it the seeded devices of all three processing modes over MQTT and HTTP, and report
what reached the database of tenant `demo`.

Three parts: devtools.supervisor starts, watches and stops the child processes (each logging to its
own file under `.run/demo/`); the feeds are threads that publish like devices do (the simulator's
publishers); `demo_report` reads the outcome with the ORM, scoped to this run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from types import FrameType
from typing import Any, Protocol

import orjson
from django.conf import settings
from django.db import connection
from django.db.models import Count, Q
from django.utils import timezone
from django_tenants.utils import schema_context

from assets.models import Alert, AlertStatus, Asset
from devices.models import Device
from devices.services import api_key_create, api_key_revoke
from devtools.services import free_port, port_open, run_dir
from devtools.simulator import HttpPublisher, MqttPublisher, SimulatorConfig, chunk_count, run_simulation
from devtools.supervisor import (
    BEAT_READY,
    BRIDGE_READY,
    INGEST_READY,
    WORKER_READY,
    ChildError,
    Supervisor,
    celery,
    http_ok,
    live_server,
    log_says,
    manage,
)
from telemetry.models import RawStatus, TelemetryRaw, TelemetryTransaction, TransactionStatus, Transport

log = logging.getLogger(__name__)

SCHEMA = "demo"
ENDPOINT_DEVICE = "TS-001-2024"
COLD_DEVICE = "TS-002-2024"
GATEWAY_DEVICE = "LH-001-2024"
CHUNKED_DEVICE = "BG-001-2024"
GATEWAY_CHILDREN = 50
CHUNKED_BEACONS = 2000
CHUNK_SIZE = 30  # 2000 beacons -> 67 chunks
ENDPOINT_INTERVAL = 1.0  # seconds between endpoint readings
HTTP_EVERY = 4  # every 4th endpoint reading goes through POST /api/v1/telemetry
GATEWAY_RATE = 1.0  # gateway messages (50 beacons each) per second
CHUNKED_INTERVAL = 10.0  # seconds between chunked transactions (67 chunks each)
CHUNKED_RATE = 200.0  # chunks per second while a transaction is being sent
READY_TIMEOUT = 120.0  # Django start-up of six processes on a busy small machine
STOP_TIMEOUT = 30.0
DRAIN_TIMEOUT = 30.0  # after the traffic stops, how long to wait for the data to arrive
REPORT_INTERVAL = 5.0


class DemoError(ChildError):
    """The demo could not run (a process of the platform did not start or died, a port is taken)."""


class Writer(Protocol):
    """Where the demo prints (a management command's stdout)."""

    def write(self, msg: str) -> Any: ...

    def flush(self) -> None: ...


# --------------------------------------------------------------------------- traffic


@dataclass
class FeedStats:
    """What the feeds sent (counters written by one feed thread each)."""

    endpoint_mqtt: int = 0
    endpoint_http: int = 0
    cold_mqtt: int = 0
    http_accepted: int = 0
    http_errors: list[str] = field(default_factory=list)
    gateway_messages: int = 0
    chunked_transactions: int = 0
    chunked_messages: int = 0
    errors: list[str] = field(default_factory=list)


def endpoint_values(step: int, rng: random.Random) -> dict[str, float]:
    """A temperature sensor on an HVAC unit: mostly in band, and for a few readings of every
    24 it runs hot (above the HVAC rule's 28 °C) while the power draw peaks (above 12 kW)."""
    hot = step % 24 in range(6, 10)
    temperature = rng.uniform(28.8, 31.0) if hot else 22.0 + 2.5 * math.sin(step / 4) + rng.uniform(-0.4, 0.4)
    power = rng.uniform(12.5, 13.5) if hot else rng.uniform(5.0, 9.0)
    return {
        "temperature": round(temperature, 2),
        "humidity": round(rng.uniform(35.0, 55.0), 1),
        "power": round(power, 2),
    }


def cold_room_values(step: int, rng: random.Random) -> dict[str, float]:
    """The cold room's sensor: -20 °C or so, and for 12 readings of every 60 the door is open and
    it warms to about -13 °C. Above -15 for 5 s the critical rule opens an alert; above -18 for
    10 s the warning does too; both resolve once it is back below the hysteresis (-16 and -19)."""
    warm = step % 60 in range(3, 15)
    temperature = rng.uniform(-13.5, -12.5) if warm else -20.0 + rng.uniform(-1.0, 0.8)
    return {"temperature": round(temperature, 2), "humidity": round(rng.uniform(60.0, 75.0), 1)}


class Feeds:
    """Device traffic in threads until `stop` is set: TS-001-2024 readings over MQTT (and every
    HTTP_EVERY-th over HTTP), TS-002-2024 cold-room readings, LH-001-2024 gateway messages,
    BG-001-2024 chunked transactions."""

    def __init__(self, *, mqtt_url: str, http_url: str, api_key: str, stop: threading.Event) -> None:
        self.mqtt_url = mqtt_url
        self.http_url = http_url
        self.api_key = api_key
        self.stop = stop
        self.stats = FeedStats()
        self.threads = [
            threading.Thread(target=self._guard, args=(self.endpoint,), name="feed-endpoint", daemon=True),
            threading.Thread(target=self._guard, args=(self.gateway,), name="feed-gateway", daemon=True),
            threading.Thread(target=self._guard, args=(self.chunked,), name="feed-chunked", daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self, timeout: float = 60.0) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout)

    def _guard(self, feed: Callable[[], None]) -> None:
        try:
            feed()
        except Exception as exc:
            # Reported in the summary; the checks then fail for the data that never came.
            log.exception("demo feed %s failed", feed.__name__)
            self.stats.errors.append(f"{feed.__name__}: {exc!r}")

    def endpoint(self) -> None:
        config = SimulatorConfig(
            devices=[ENDPOINT_DEVICE],
            mqtt_url=self.mqtt_url,
            transport="http",
            http_url=self.http_url,
            api_keys={ENDPOINT_DEVICE: self.api_key},
            # Each device its own connection with a last will: the admin and dashboard show presence.
            presence=True,
        )
        mqtt = MqttPublisher(config, [ENDPOINT_DEVICE, COLD_DEVICE], 0)
        web = HttpPublisher(config)
        rng = random.Random()  # noqa: S311 - demo data, not secrets
        run = f"demo{int(time.time())}"
        last_ts = 0
        step = 0
        try:
            while not self.stop.is_set():
                last_ts = max(int(time.time() * 1000), last_ts + 1)
                body = orjson.dumps({"msg_id": f"{run}-e{step}", "ts": last_ts, "values": endpoint_values(step, rng)})
                if step % HTTP_EVERY == HTTP_EVERY - 1:
                    web.publish(ENDPOINT_DEVICE, body)
                    self.stats.endpoint_http += 1
                    self.stats.http_accepted = web.acked
                    self.stats.http_errors = web.error_samples
                else:
                    mqtt.publish(ENDPOINT_DEVICE, body)
                    self.stats.endpoint_mqtt += 1
                cold = {"msg_id": f"{run}-c{step}", "ts": last_ts, "values": cold_room_values(step, rng)}
                mqtt.publish(COLD_DEVICE, orjson.dumps(cold))
                self.stats.cold_mqtt += 1
                step += 1
                deadline = time.monotonic() + ENDPOINT_INTERVAL
                while not self.stop.is_set() and time.monotonic() < deadline:
                    mqtt.poll(0.05)
            mqtt.flush(10.0)
        finally:
            mqtt.close()
            web.close()

    def gateway(self) -> None:
        config = SimulatorConfig(
            devices=[GATEWAY_DEVICE],
            mqtt_url=self.mqtt_url,
            mode="gateway",
            children=GATEWAY_CHILDREN,
            rate=GATEWAY_RATE,
            presence=True,
        )
        result = run_simulation(config, stop=self.stop)
        self.stats.gateway_messages = result.sent

    def chunked(self) -> None:
        total = chunk_count(CHUNKED_BEACONS, CHUNK_SIZE)
        while not self.stop.is_set():
            started = time.monotonic()
            # A fresh config each time: run_simulation gives it a new msg_id prefix.
            config = SimulatorConfig(
                devices=[CHUNKED_DEVICE],
                mqtt_url=self.mqtt_url,
                mode="gateway_chunked",
                beacons=CHUNKED_BEACONS,
                chunk_size=CHUNK_SIZE,
                shuffle_chunks=True,
                rate=CHUNKED_RATE,
                messages=total,
            )
            # No stop event: a transaction once begun is always sent whole.
            result = run_simulation(config)
            self.stats.chunked_messages += result.sent
            self.stats.chunked_transactions += 1
            self.stop.wait(max(0.0, CHUNKED_INTERVAL - (time.monotonic() - started)))


# --------------------------------------------------------------------------- report


@dataclass
class DemoReport:
    """What this run's traffic left in tenant `demo` (rows since `since`)."""

    since: datetime
    messages: list[tuple[str, str, str, int]]  # device, transport, status, count
    rejected: list[tuple[str, int]]  # reason, count
    history: list[tuple[str, int, int]]  # source device (gateway for children), rows, devices
    transactions: dict[str, int]
    children: list[tuple[str, int, int]]  # gateway, children, of which new this run
    alerts_raised: list[
        tuple[str, str, str, float | None, datetime, str]
    ]  # severity, asset, metric, value, raised, status
    open_alerts: list[tuple[str, str, str, float | None, datetime, str]]
    assets: list[tuple[str, Decimal | None, datetime | None, str]]
    dead_letters: dict[str, int] | None  # reason -> messages dead-lettered in this run

    def history_rows(self, source: str) -> int:
        return sum(rows for name, rows, _ in self.history if name == source)

    def accepted(self, transport: str) -> int:
        return sum(n for _, t, status, n in self.messages if t == transport and status == RawStatus.ACCEPTED)

    def checks(self) -> dict[str, bool]:
        """What must have arrived for the demo to count as a success."""
        scored = [a for a in self.assets if a[3] != "none"]
        return {
            "endpoint readings stored": self.history_rows(ENDPOINT_DEVICE) > 0,
            "HTTP readings accepted": self.accepted(Transport.HTTP) > 0,
            "gateway children stored": self.history_rows(GATEWAY_DEVICE) > 0,
            "chunked transaction complete": self.transactions.get(TransactionStatus.COMPLETE, 0) > 0,
            "health scores updated": bool(scored) and all(a[2] is not None and a[2] >= self.since for a in scored),
        }

    def progress_line(self, elapsed: float) -> str:
        messages = sum(n for *_, n in self.messages)
        tx = " ".join(f"{k}={v}" for k, v in sorted(self.transactions.items())) or "none"
        scores = " ".join(f"{name.split()[0]}={score}" for name, score, *_ in self.assets)
        return (
            f"[{elapsed:5.0f}s] messages {messages}, readings stored {sum(r for _, r, _ in self.history)}, "
            f"transactions {tx}, open alerts {len(self.open_alerts)}, health {scores}"
        )


def _asset_rows() -> list[tuple[str, Decimal | None, datetime | None, str]]:
    assets = Asset.objects.select_related("asset_type").order_by("name")
    return [
        (a.name, a.health_score, a.health_score_updated_at, a.health_score_computed_by or a.asset_type.health_algorithm)
        for a in assets
    ]


def _alert_row(alert: Alert) -> tuple[str, str, str, float | None, datetime, str]:
    return (alert.severity, alert.asset.name, alert.metric, alert.value, alert.raised_at, alert.status)


def demo_report(*, since: datetime, nats_url: str, dead_letters_before: dict[str, int] | None) -> DemoReport:
    """Read this run's outcome from schema `demo` (and the dead-letter stream)."""
    with schema_context(SCHEMA):
        raw = TelemetryRaw.objects.filter(received_at__gte=since)
        messages = [
            (r["logical_identifier"], r["transport"], r["status"], r["n"])
            for r in raw.values("logical_identifier", "transport", "status")
            .annotate(n=Count("id"))
            .order_by("logical_identifier", "transport", "status")
        ]
        rejected = [
            (r["reason"], r["n"])
            for r in raw.filter(status=RawStatus.REJECTED).values("reason").annotate(n=Count("id")).order_by("-n")[:5]
        ]
        with connection.cursor() as cursor:
            # A child's readings count under its gateway: that is the device that sent them.
            cursor.execute(
                """
                SELECT coalesce(p.logical_identifier, d.logical_identifier), count(*), count(DISTINCT h.device_id)
                FROM telemetry_history h
                JOIN devices d ON d.id = h.device_id
                LEFT JOIN devices p ON p.id = d.parent_device_id
                WHERE h.time >= %s
                GROUP BY 1 ORDER BY 1
                """,
                [since],
            )
            history = [(str(name), int(rows), int(devices)) for name, rows, devices in cursor.fetchall()]
        transactions = {
            r["status"]: r["n"]
            for r in TelemetryTransaction.objects.filter(first_chunk_at__gte=since)
            .values("status")
            .annotate(n=Count("id"))
        }
        children = [
            (r["parent_device__logical_identifier"], r["n"], r["new"])
            for r in Device.objects.filter(parent_device__isnull=False)
            .values("parent_device__logical_identifier")
            .annotate(n=Count("id"), new=Count("id", filter=Q(created_at__gte=since)))
            .order_by("parent_device__logical_identifier")
        ]
        alerts = Alert.objects.select_related("asset").order_by("raised_at")
        alerts_raised = [_alert_row(a) for a in alerts.filter(raised_at__gte=since)]
        open_alerts = [_alert_row(a) for a in alerts.exclude(status=AlertStatus.RESOLVED)]
        assets = _asset_rows()
    dead = dead_letter_counts(nats_url)
    if dead is not None:
        # The stream is created by the first process that connects: nothing before means none.
        before = dead_letters_before or {}
        dead = {reason: n - before.get(reason, 0) for reason, n in dead.items() if n > before.get(reason, 0)}
    return DemoReport(
        since=since,
        messages=messages,
        rejected=rejected,
        history=history,
        transactions=transactions,
        children=children,
        alerts_raised=alerts_raised,
        open_alerts=open_alerts,
        assets=assets,
        dead_letters=dead,
    )


def dead_letter_counts(nats_url: str) -> dict[str, int] | None:
    """Messages in the JetStream dead-letter stream per reason (None if it cannot be asked)."""
    import nats
    from nats.errors import Error as NatsError

    from telemetry.jetstream import DEADLETTER_STREAM

    async def ask() -> dict[str, int]:
        nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
        try:
            info = await nc.jetstream().stream_info(DEADLETTER_STREAM, subjects_filter=">")
            return {subject.removeprefix("deadletter."): int(n) for subject, n in (info.state.subjects or {}).items()}
        finally:
            await nc.close()

    try:
        return asyncio.run(asyncio.wait_for(ask(), 5))
    except (NatsError, OSError, TimeoutError):
        return None


def _shown(value: float | None) -> str:
    return "no data" if value is None else f"{value:g}"


def format_report(report: DemoReport, stats: FeedStats, *, port: str, live_port: str, admin: str) -> str:
    """The final report, as printed."""
    lines = [f"Argus demo: what happened since {report.since:%H:%M:%S} UTC", "", "Sent by the simulated devices:"]
    lines.append(
        f"  {ENDPOINT_DEVICE} (endpoint): {stats.endpoint_mqtt} readings over MQTT, {stats.endpoint_http} over HTTP "
        f"({stats.http_accepted} answered 202)"
    )
    lines.append(f"  {COLD_DEVICE} (endpoint, Cold Storage Room 1): {stats.cold_mqtt} readings over MQTT")
    lines.append(f"  {GATEWAY_DEVICE} (gateway): {stats.gateway_messages} messages of {GATEWAY_CHILDREN} beacons")
    lines.append(
        f"  {CHUNKED_DEVICE} (gateway_chunked): {stats.chunked_transactions} transactions of "
        f"{CHUNKED_BEACONS} beacons in {chunk_count(CHUNKED_BEACONS, CHUNK_SIZE)} chunks "
        f"({stats.chunked_messages} messages)"
    )
    for error in [*stats.errors, *stats.http_errors]:
        lines.append(f"  ! {error}")
    lines += ["", "Messages in (telemetry_raw, by device, transport and status):"]
    lines += [f"  {d:<14} {t:<5} {s:<9} {n:>6}" for d, t, s, n in report.messages] or ["  none"]
    for reason, n in report.rejected:
        lines.append(f"  rejected {n}x: {reason}")
    lines += ["", "Readings stored (telemetry_history; a gateway's children under the gateway):"]
    lines += [f"  {name:<14} {rows:>7} rows from {devices} device(s)" for name, rows, devices in report.history] or [
        "  none"
    ]
    tx = ", ".join(f"{status} {n}" for status, n in sorted(report.transactions.items())) or "none"
    lines += ["", f"Chunked transactions: {tx}"]
    lines += ["", "Devices auto-registered under gateways:"]
    lines += [f"  {gw:<14} {n:>5} children ({new} new in this run)" for gw, n, new in report.children] or ["  none"]
    lines += ["", f"Alerts raised in this run: {len(report.alerts_raised)}"]
    lines += [
        f"  {raised:%H:%M:%S} {sev:<8} {asset}: {metric} = {_shown(value)} (now {status})"
        for sev, asset, metric, value, raised, status in report.alerts_raised
    ]
    lines += ["Open alerts:"]
    lines += [
        f"  {sev:<8} {asset}: {metric} = {_shown(value)} (since {raised:%H:%M:%S}, {status})"
        for sev, asset, metric, value, raised, status in report.open_alerts
    ] or ["  none"]
    lines += ["", "Asset health scores:"]
    for name, score, updated, algorithm in report.assets:
        when = f"updated {updated:%H:%M:%S}" if updated else "never scored"
        lines.append(f"  {name:<22} {score if score is not None else '-':>7}  ({algorithm}, {when})")
    if report.dead_letters is None:
        dead = "unknown (NATS not reachable)"
    else:
        dead = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dead_letters.items())) or "none"
    lines += ["", f"Dead letters in this run (JetStream stream DEADLETTER, by reason): {dead}"]
    if report.dead_letters and "unknown_device" in report.dead_letters:
        lines.append("  (unknown_device: messages for ids no tenant registered, e.g. queued for the bridge's session)")
    lines += [
        "",
        "Open:",
        f"  admin     http://localhost:{port}/admin/   (tenant 'demo', log in as {admin})",
        f"  dashboard http://localhost:{live_port}/dashboard/   (live; the same login)",
        f"  API docs  http://localhost:{port}/api/docs/",
        f"  ingest    POST http://localhost:{port}/api/v1/telemetry   (Authorization: Api-Key <key>; "
        f"`manage.py create_device_key {ENDPOINT_DEVICE}`)",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the run


@contextlib.contextmanager
def _signals_set(event: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT (Ctrl-C) set event instead of interrupting."""

    def handler(signum: int, frame: FrameType | None) -> None:
        event.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _metrics_port(env: dict[str, str], name: str, default: int) -> None:
    # The long-running commands serve metrics on fixed ports; a second copy elsewhere on the
    # machine (a benchmark, another checkout) would make ours fail to start.
    if name not in env:
        env[name] = str(free_port() if port_open("127.0.0.1", default) else default)


class Demo:
    """One demo run; `run()` returns the exit code."""

    STOP_ORDER = [["bridge", "web", "live"], ["ingest"], ["worker", "beat"]]

    def __init__(self, out: Writer, *, seconds: float | None) -> None:
        self.out = out
        self.seconds = seconds
        self.port = os.environ.get("ARGUS_WEB_PORT", "8000")
        # The dashboard and its event stream: the ASGI server, next to the web server.
        self.live_port = os.environ.get("ARGUS_LIVE_PORT", str(int(self.port) + 1))
        self.admin = f"admin / {os.environ.get('ARGUS_ADMIN_PASSWORD', 'argus-demo-admin')}"
        self.stopping = threading.Event()
        self.log_dir = run_dir() / "demo"
        env = dict(os.environ)
        _metrics_port(env, "ARGUS_BRIDGE_METRICS_PORT", settings.ARGUS_BRIDGE_METRICS_PORT)
        _metrics_port(env, "ARGUS_INGEST_METRICS_PORT", settings.ARGUS_INGEST_METRICS_PORT)
        _metrics_port(env, "ARGUS_CELERY_METRICS_PORT", settings.ARGUS_CELERY_METRICS_PORT)
        env.setdefault("ARGUS_DASHBOARD_PORT", self.live_port)  # the admin's header links there
        self.env = env
        self.supervisor = self._supervisor()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _supervisor(self) -> Supervisor:
        sup = Supervisor(self.log_dir, self.env)
        gunicorn = [
            sys.executable,
            "-m",
            "gunicorn",
            "argus.wsgi",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            "2",
        ]
        # gunicorn.conf.py: /metrics adds up the workers' values (prometheus-client multiprocess mode).
        sup.add(
            "web",
            [*gunicorn, "--config", "gunicorn.conf.py", "--access-logfile", "-", "--graceful-timeout", "10"],
            http_ok(f"http://127.0.0.1:{self.port}/healthz"),
        )
        # The dashboard's event stream: ASGI under gunicorn (uvicorn's worker class), one process.
        sup.add(
            "live",
            live_server(int(self.live_port), "--workers", "1", "--graceful-timeout", "10"),
            http_ok(f"http://127.0.0.1:{self.live_port}/healthz"),
        )
        sup.add("bridge", manage("runbridge"), log_says(BRIDGE_READY))
        sup.add("ingest", manage("runingest"), log_says(INGEST_READY))
        worker = sup.add(
            "worker", celery("worker", "-c", "2", "-l", "INFO", "-n", f"demo-{os.getpid()}@%h"), log_says(WORKER_READY)
        )
        # The prefork pool's children count the tasks; the main process's /metrics adds them up
        # from this directory, which it empties at start (argus/celery_metrics.py).
        worker.env = {**self.env, "PROMETHEUS_MULTIPROC_DIR": str(self.log_dir / "metrics-worker")}
        sup.add(
            "beat", celery("beat", "-l", "INFO", "-s", str(self.log_dir / "celerybeat-schedule")), log_says(BEAT_READY)
        )
        return sup

    def run(self) -> int:
        if port_open("127.0.0.1", int(self.port)):
            raise DemoError(f"port {self.port} is already in use; set ARGUS_WEB_PORT to a free one")
        if port_open("127.0.0.1", int(self.live_port)):
            raise DemoError(f"port {self.live_port} is already in use; set ARGUS_LIVE_PORT to a free one")
        with _signals_set(self.stopping):
            return self._run()

    def _run(self) -> int:
        since = timezone.now()
        dead_before = dead_letter_counts(settings.NATS_URL)
        api_key, key = api_key_create(logical_id=ENDPOINT_DEVICE, tenant_schema=SCHEMA)
        self.say(f"Starting web, live, bridge, ingest, worker and beat (logs in {self.log_dir}) ...")
        self.supervisor.start()
        feeds: Feeds | None = None
        codes: dict[str, int | None] = {}
        try:
            took = self.supervisor.wait_ready(READY_TIMEOUT, self.stopping)
            self.say(f"All processes ready after {took:.1f} s. Feeding simulated devices ...")
            self.say(
                f"  {ENDPOINT_DEVICE} every {ENDPOINT_INTERVAL:g} s (every {HTTP_EVERY}th over HTTP), "
                f"{GATEWAY_DEVICE} {GATEWAY_RATE:g} msg/s x {GATEWAY_CHILDREN} beacons, "
                f"{CHUNKED_DEVICE} one {CHUNKED_BEACONS}-beacon transaction every {CHUNKED_INTERVAL:g} s"
            )
            if self.seconds is None:
                self.say("Press Ctrl-C to stop.")
            feeds = Feeds(
                mqtt_url=settings.MQTT_URL,
                http_url=f"http://127.0.0.1:{self.port}/api/v1/telemetry",
                api_key=key,
                stop=threading.Event(),
            )
            feeds.start()
            started = time.monotonic()
            end = started + self.seconds if self.seconds is not None else math.inf
            while not self.stopping.wait(min(REPORT_INTERVAL, max(0.0, end - time.monotonic()))):
                self.supervisor.check_alive()
                report = demo_report(since=since, nats_url=settings.NATS_URL, dead_letters_before=dead_before)
                self.say(report.progress_line(time.monotonic() - started))
                if time.monotonic() >= end:
                    break
            self.say("Stopping the simulated devices; waiting for the last data to arrive ...")
            feeds.join()
            self._drain(since, dead_before, started)
        except ChildError as exc:
            self.say(f"ERROR: {exc}")
            codes = self.supervisor.stop(self.STOP_ORDER, STOP_TIMEOUT)
            return 1
        finally:
            if feeds is not None:
                feeds.join()
            if not codes:
                self.say("Stopping the platform's processes (SIGTERM) ...")
                codes = self.supervisor.stop(self.STOP_ORDER, STOP_TIMEOUT)
            api_key_revoke(prefix=api_key.prefix)
        report = demo_report(since=since, nats_url=settings.NATS_URL, dead_letters_before=dead_before)
        self.say("")
        self.say(format_report(report, feeds.stats, port=self.port, live_port=self.live_port, admin=self.admin))
        self.say("")
        self.say("Process exit codes: " + ", ".join(f"{name} {code}" for name, code in codes.items()))
        failed = [name for name, ok in report.checks().items() if not ok]
        failed += [f"{name} exited with {code}" for name, code in codes.items() if code != 0]
        for name, ok in report.checks().items():
            self.say(f"  [{'ok' if ok else 'MISSING'}] {name}")
        if failed:
            self.say("DEMO FAILED: " + "; ".join(failed) + f" (logs in {self.log_dir})")
            return 1
        self.say("DEMO OK: every processing mode delivered data end to end.")
        return 0

    def _drain(self, since: datetime, dead_before: dict[str, int] | None, started: float) -> None:
        """Wait until the checks pass (chunk reassembly, scoring) or DRAIN_TIMEOUT passes."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline and not self.stopping.is_set():
            self.supervisor.check_alive()
            report = demo_report(since=since, nats_url=settings.NATS_URL, dead_letters_before=dead_before)
            if all(report.checks().values()) and not report.transactions.get(TransactionStatus.PENDING):
                return
            self.say(report.progress_line(time.monotonic() - started) + " (draining)")
            self.stopping.wait(2.0)
