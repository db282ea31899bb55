"""The fault suite: each fault of issue 11 run on real processes and servers, then checked.

`manage.py faults` (and `make faults`; `FAULTS=name,name` picks some) runs every fault against a
private Mosquitto (the shipped config) and a private nats-server, with runbridge and runingest as
children. A device (paho, QoS 1, persistent session, reconnecting) publishes at a fixed rate
while the fault happens; afterwards the checker compares the msg_ids the broker acknowledged
(PUBACK) with the rows in telemetry_raw: lost = acknowledged but not stored, duplicates = stored
more than once. One JSON line per fault; `--write-docs` puts the figures into docs/validation.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import nats
import orjson
import paho.mqtt.client as mqtt
import psycopg
import redis
from django.conf import settings
from django.core.management import call_command
from django.db import connection, transaction
from django_tenants.utils import schema_context
from nats.js.errors import NotFoundError
from paho.mqtt.enums import CallbackAPIVersion
from psycopg import sql

from devices.models import Device, DeviceType, ProcessingMode
from devtools.bench import ensure_tenant
from devtools.services import ServerHandle, start_mosquitto, start_nats
from devtools.supervisor import BRIDGE_READY, INGEST_READY, Child, ChildError, Supervisor, log_says, manage
from telemetry.jetstream import DEADLETTER_STREAM

SCHEMA = "faults"
DEVICE = "FAULTS-0001"
DEVICE_TYPE = "Faults Endpoint"
READY_TIMEOUT = 90.0  # Django start-up of a process on a busy 2-core machine
ACK_TIMEOUT = 60.0  # for the broker to acknowledge what the device sent
DRAIN_IDLE_SECONDS = 20.0  # nothing new stored for this long: the pipeline has given up
STOP_TIMEOUT = 60.0
DOCS = Path(__file__).resolve().parent.parent / "docs" / "validation.md"
TABLE_BEGIN = "<!-- faults:begin (written by `make faults`) -->"
TABLE_END = "<!-- faults:end -->"


class FaultError(ChildError):
    """The suite could not set up, start or observe the pipeline."""


# --------------------------------------------------------------------------- the device side


class SimulatedDevice:
    """One device: paho with a persistent session (clean_session=False) that reconnects by itself
    and sends again the QoS 1 messages it has no PUBACK for; remembers which msg_id got one."""

    def __init__(self, mqtt_url: str, client_id: str, logical_id: str) -> None:
        host, port = mqtt_url.removeprefix("mqtt://").split(":")
        self.topic = f"devices/{logical_id}/telemetry"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311
        )
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(1, 2)
        self.client.connect_async(host, int(port), keepalive=10)
        self.client.loop_start()
        self.sent: list[tuple[str, mqtt.MQTTMessageInfo]] = []

    def send(self, msg_id: str, value: float) -> None:
        body = orjson.dumps({"msg_id": msg_id, "values": {"temperature": value}})
        self.sent.append((msg_id, self.client.publish(self.topic, body, qos=1)))

    def acked(self) -> list[str]:
        # Not info.is_published(): it raises for a message published while the connection was
        # down (rc NO_CONN) even after paho sent it on reconnecting and got its PUBACK.
        return [msg_id for msg_id, info in self.sent if info._published]

    def wait_connected(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.client.is_connected():
            if time.monotonic() > deadline:
                raise FaultError(f"the device could not connect to the broker within {timeout:.0f} s")
            time.sleep(0.05)

    def wait_acked(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked()) < len(self.sent) and time.monotonic() < deadline:
            time.sleep(0.2)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_at_rate(device: SimulatedDevice, prefix: str, rate: float, seconds: float, stop: threading.Event) -> None:
    """msg_ids prefix0, prefix1, … at `rate` a second for `seconds`."""
    started = time.monotonic()
    for i in range(int(rate * seconds)):
        delay = started + i / rate - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return
        device.send(f"{prefix}{i}", float(i % 100))


# --------------------------------------------------------------------------- the checker


@dataclass
class Outcome:
    """What the checker found for one fault: the JSON line's figures and why it failed."""

    fault: str
    acked: int
    stored: int
    lost: int
    duplicates: int
    problems: list[str] = field(default_factory=list)
    sent: int = 0
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not (self.lost or self.duplicates or self.problems)

    def as_dict(self) -> dict[str, Any]:
        return {
            "fault": self.fault,
            "acked": self.acked,
            "stored": self.stored,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "passed": self.passed,
            "sent": self.sent,
            "seconds": round(self.seconds, 1),
            "problems": self.problems,
        }


def stored_counts(schema: str, logical_id: str, prefix: str) -> dict[str, int]:
    """Rows in telemetry_raw per msg_id for the device's messages whose msg_id starts with prefix."""
    like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    with schema_context(schema), connection.cursor() as cursor:
        cursor.execute(
            "SELECT msg_id, count(*) FROM telemetry_raw WHERE logical_identifier = %s AND msg_id LIKE %s"
            " GROUP BY msg_id",
            [logical_id, like],
        )
        return {msg_id: int(count) for msg_id, count in cursor.fetchall()}


def compare(fault: str, acked: list[str], stored: dict[str, int]) -> Outcome:
    """lost: acknowledged, never stored; duplicates: rows beyond the first of a msg_id."""
    return Outcome(
        fault=fault,
        acked=len(acked),
        stored=sum(stored.values()),
        lost=len(set(acked) - stored.keys()),
        duplicates=sum(count - 1 for count in stored.values()),
    )


def rejected(schema: str, logical_id: str, prefix: str) -> int:
    like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    with schema_context(schema), connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM telemetry_raw WHERE logical_identifier = %s AND msg_id LIKE %s"
            " AND status <> 'accepted'",
            [logical_id, like],
        )
        return int(cursor.fetchone()[0])


def deadletter_count(nats_url: str) -> int:
    """Messages in the DEADLETTER stream (0 when it does not exist)."""

    async def count() -> int:
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jetstream().stream_info(DEADLETTER_STREAM)
            return int(info.state.messages)
        except NotFoundError:
            return 0
        finally:
            await nc.close()

    return asyncio.run(count())


# --------------------------------------------------------------------------- the database outage


def database_url() -> str:
    """The URL of the database this process uses."""
    s = connection.settings_dict
    auth = s["USER"] or "postgres"
    if s["PASSWORD"]:
        auth += f":{s['PASSWORD']}"
    return f"postgresql://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


@contextmanager
def database_down(dbname: str, keep_pid: int = 0) -> Iterator[threading.Event]:
    """Refuse new connections to `dbname` and keep terminating those that exist (all but
    `keep_pid`) until the block ends, from a session on `postgres`: for runbridge and runingest,
    the server is down. (`pg_ctl stop -m immediate` would stop other users' databases too.)"""
    admin = psycopg.connect(database_url().rsplit("/", 1)[0] + "/postgres", autocommit=True)
    name = sql.Identifier(dbname)
    admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(name))
    over = threading.Event()

    def terminate() -> None:
        while not over.is_set():
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> %s AND pid <> pg_backend_pid()",
                (dbname, keep_pid),
            )
            over.wait(0.2)

    killer = threading.Thread(target=terminate, name="database-down")
    killer.start()
    try:
        yield over
    finally:
        over.set()
        killer.join()
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(name))
        admin.close()


# --------------------------------------------------------------------------- the faults


@dataclass
class Fault:
    """A fault: the load around it and what it does (`act` starts `before` seconds into the load
    and returns once the fault is over, `during` seconds later)."""

    name: str
    description: str
    rate: float  # messages a second
    before: float  # seconds of load before the fault
    during: float  # how long the fault lasts
    after: float  # seconds of load after it
    act: Callable[[FaultRun], None]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.before + self.during + self.after


def _postgres_outage(run: FaultRun) -> None:
    connection.close()  # ours goes too; Django reconnects afterwards
    with database_down(str(connection.settings_dict["NAME"])):
        time.sleep(run.fault.during)
        for name in ("runbridge", "runingest"):
            if not run.child(name).running():
                run.problems.append(f"{name} exited during the database outage")


def _restart(run: FaultRun, name: str) -> None:
    """SIGKILL a child, keep it down `during` seconds, start it again (new log file)."""
    child = run.child(name)
    child.kill()
    time.sleep(run.fault.during)
    child.log_path = child.log_path.with_name(f"{name}-{uuid.uuid4().hex[:4]}.log")
    child.start()
    child.wait_ready(READY_TIMEOUT)


def _nats_restart(run: FaultRun) -> None:
    assert run.nats is not None
    run.nats.kill()
    time.sleep(run.fault.during)
    run.nats.restart(graceful=False)  # same port, same store


def _broker_restart(run: FaultRun) -> None:
    assert run.broker is not None
    run.broker.restart(graceful=True)  # the shipped config: persistence on, saved at shutdown
    time.sleep(run.fault.during)


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in [
        Fault(
            "postgres-outage",
            "PostgreSQL refuses and drops every connection to the database for 30 s during 100 msg/s; "
            "runbridge looks routes up every second (ARGUS_BRIDGE_ROUTE_TTL_SECONDS=1), so both processes "
            "meet the outage. Also fails on any dead letter or if either process exits.",
            100,
            5,
            30,
            5,
            _postgres_outage,
            {"ARGUS_BRIDGE_ROUTE_TTL_SECONDS": "1"},
        ),
        Fault(
            "bridge-killed",
            "runbridge SIGKILLed for 30 s while the device publishes 500 msg/s; the broker (shipped config) "
            "queues the bridge's persistent session; then runbridge is started again.",
            500,
            5,
            30,
            5,
            lambda run: _restart(run, "runbridge"),
        ),
        Fault(
            "ingest-killed",
            "runingest SIGKILLed for 10 s during 300 msg/s and started again; JetStream redelivers what it "
            "had not acknowledged.",
            300,
            5,
            10,
            5,
            lambda run: _restart(run, "runingest"),
        ),
        Fault(
            "nats-restart",
            "nats-server SIGKILLed during 300 msg/s, down 5 s, started again on the same store.",
            300,
            5,
            5,
            10,
            _nats_restart,
        ),
        Fault(
            "broker-restart",
            "Mosquitto restarted (SIGTERM, persistence on) during 300 msg/s; the device and the bridge "
            "reconnect, the device sends again what it had no PUBACK for.",
            300,
            5,
            5,
            10,
            _broker_restart,
        ),
    ]
}


class FaultRun:
    """One fault on its own broker, NATS, runbridge and runingest; `run()` returns the Outcome."""

    def __init__(
        self,
        fault: Fault,
        *,
        schema: str,
        logical_id: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.fault = fault
        self.schema = schema
        self.logical_id = logical_id
        self.log_dir = log_dir
        self.base_env = dict(os.environ if env is None else env)
        self.log = log
        self.run_id = f"{fault.name}-{time.strftime('%m%d%H%M%S')}-{uuid.uuid4().hex[:4]}"
        self.problems: list[str] = []
        self.broker: ServerHandle | None = None
        self.nats: ServerHandle | None = None
        self.pipeline: Supervisor | None = None

    def child(self, name: str) -> Child:
        assert self.pipeline is not None
        return self.pipeline.child(name)

    def run(self) -> Outcome:
        started = time.monotonic()
        fault = self.fault
        self.broker = start_mosquitto(workdir=self.log_dir / "mosquitto")
        self.nats = start_nats(workdir=self.log_dir / "nats")
        env = dict(self.base_env)
        env.update(
            MQTT_URL=self.broker.url,
            NATS_URL=self.nats.url,
            ARGUS_BRIDGE_CLIENT_ID=f"argus-faults-{self.run_id}",
            ARGUS_BRIDGE_SHARE_GROUP="",
            ARGUS_BRIDGE_METRICS_PORT="0",
            ARGUS_INGEST_METRICS_PORT="0",
            ARGUS_CELERY_METRICS_PORT="0",
            ARGUS_BRIDGE_DEVICE_RATE="0",
            **fault.env,
        )
        self.pipeline = Supervisor(self.log_dir, env)
        self.pipeline.add("runingest", manage("runingest"), log_says(INGEST_READY))
        self.pipeline.add("runbridge", manage("runbridge"), log_says(BRIDGE_READY))
        self.pipeline.start()
        self.pipeline.wait_ready(READY_TIMEOUT)
        self.log(f"{fault.name}: pipeline ready; {fault.rate:g} msg/s for {fault.seconds:g} s, logs in {self.log_dir}")

        device = SimulatedDevice(self.broker.url, f"faults-device-{self.run_id}", self.logical_id)
        prefix = f"{self.run_id}-"
        device.wait_connected(10)
        stop = threading.Event()
        load = threading.Thread(
            target=publish_at_rate, args=(device, prefix, fault.rate, fault.seconds, stop), name="faults-load"
        )
        try:
            load.start()
            time.sleep(fault.before)
            self.log(f"{fault.name}: fault on")
            fault.act(self)
            self.log(f"{fault.name}: fault over")
            load.join()
            device.wait_acked(ACK_TIMEOUT)
            acked = device.acked()
            self.drain(set(acked), prefix)
            time.sleep(1)  # anything redelivered late shows up now
            outcome = compare(fault.name, acked, stored_counts(self.schema, self.logical_id, prefix))
            outcome.sent = len(device.sent)
        finally:
            stop.set()
            load.join()
            device.close()
        bad = rejected(self.schema, self.logical_id, prefix)
        if bad:
            self.problems.append(f"{bad} stored as rejected")
        deadletters = deadletter_count(self.nats.url)
        if deadletters:
            self.problems.append(f"{deadletters} dead letters")
        for name in ("runbridge", "runingest"):
            if not self.child(name).running():
                self.problems.append(f"{name} not running at the end")
        outcome.problems = self.problems
        outcome.seconds = time.monotonic() - started
        return outcome

    def drain(self, acked: set[str], prefix: str) -> None:
        """Wait until every acknowledged message is stored, or nothing new is for a while."""
        stored, last_progress = -1, time.monotonic()
        while True:
            found = stored_counts(self.schema, self.logical_id, prefix)
            if len(found) != stored:
                stored, last_progress = len(found), time.monotonic()
            if acked <= found.keys() or time.monotonic() - last_progress > DRAIN_IDLE_SECONDS:
                return
            time.sleep(0.5)

    def close(self) -> None:
        if self.pipeline is not None:
            codes = self.pipeline.stop([["runbridge"]], STOP_TIMEOUT)
            self.log(f"{self.fault.name}: exit codes {codes}")
        for server in (self.broker, self.nats):
            if server is not None:
                server.stop()


# --------------------------------------------------------------------------- the suite


def ensure_device() -> None:
    """Tenant `faults` with one endpoint device (idempotent; migrates every schema first)."""
    call_command("migrate_schemas", interactive=False, verbosity=0)
    ensure_tenant(SCHEMA, "Fault suite", lambda line: None)
    with schema_context(SCHEMA), transaction.atomic():
        device_type = DeviceType.objects.filter(name=DEVICE_TYPE).first()
        if device_type is None:
            device_type = DeviceType(
                name=DEVICE_TYPE,
                description="Created by manage.py faults",
                processing_mode=ProcessingMode.ENDPOINT,
                metrics=["temperature"],
                message_schema={"type": "object", "required": ["values"]},
            )
            device_type.full_clean()
            device_type.save()
        if not Device.objects.filter(logical_identifier=DEVICE).exists():
            Device.objects.create(device_type=device_type, name="fault suite device", logical_identifier=DEVICE)


def selected(names: str) -> list[Fault]:
    """The faults named in a comma-separated list (all when empty)."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in FAULTS]
    if unknown:
        raise FaultError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    return [FAULTS[n] for n in wanted] if wanted else list(FAULTS.values())


def run_suite(faults: list[Fault], log: Callable[[str], None], emit: Callable[[str], None]) -> list[Outcome]:
    """Run each fault in turn on the `faults` tenant; emit its JSON line as soon as it is known."""
    ensure_device()
    base = Path(settings.BASE_DIR) / ".run" / "faults" / time.strftime("%Y%m%d-%H%M%S")
    # runingest queues follow-up tasks after every batch and no worker runs here: keep them out of
    # the real queue (the Redis database manage.py bench uses) and drop them afterwards.
    celery_url = os.environ.get("FAULTS_CELERY_BROKER_URL") or urlunparse(
        urlparse(settings.REDIS_URL)._replace(path="/13")
    )
    env = dict(os.environ, CELERY_BROKER_URL=celery_url)
    outcomes = []
    for fault in faults:
        run = FaultRun(fault, schema=SCHEMA, logical_id=DEVICE, log_dir=base / fault.name, env=env, log=log)
        try:
            outcome = run.run()
        except ChildError as exc:
            log(f"{fault.name}: could not run: {exc}")
            outcome = Outcome(fault.name, 0, 0, 0, 0, problems=[f"could not run: {str(exc).splitlines()[0]}"])
        finally:
            run.close()
        outcomes.append(outcome)
        emit(json.dumps(outcome.as_dict(), separators=(",", ":")))
    redis.Redis.from_url(celery_url).delete("celery")  # Celery's default queue
    return outcomes


def write_docs(outcomes: list[Outcome], path: Path = DOCS) -> None:
    """Put the outcomes into the table of docs/validation.md (rows of faults not run are kept)."""
    text = path.read_text(encoding="utf-8")
    head, _, rest = text.partition(TABLE_BEGIN)
    old_table, _, tail = rest.partition(TABLE_END)
    rows: dict[str, str] = {}
    for line in old_table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and cells:
            rows[cells[0].strip("`")] = line
    when = time.strftime("%Y-%m-%d")
    for o in outcomes:
        why = o.problems or [f"lost {o.lost}, duplicates {o.duplicates}"]
        passed = "yes" if o.passed else "**no**: " + "; ".join(why)
        rows[o.fault] = (
            f"| `{o.fault}` | {o.sent} | {o.acked} | {o.stored} | {o.lost} | {o.duplicates} | {passed} | {when} |"
        )
    order = [n for n in FAULTS if n in rows] + [n for n in rows if n not in FAULTS]
    table = [
        "| fault | sent | acked | stored | lost | duplicates | passed | run |",
        "|---|---:|---:|---:|---:|---:|---|---|",
        *(rows[n] for n in order),
    ]
    path.write_text(head + TABLE_BEGIN + "\n" + "\n".join(table) + "\n" + TABLE_END + tail, encoding="utf-8")
