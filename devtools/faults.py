"""The fault suite: each fault run on real processes and servers, then checked.

`manage.py faults` (and `make faults`; `FAULTS=name,name` picks some) runs every fault against a
private Mosquitto (the shipped config) and a private nats-server, with runbridge and runingest as
children; the cluster faults on three nats-servers as one JetStream cluster (streams R3), with
two bridges on an MQTT shared subscription or two runingest on the one durable where they need
them. A device (paho, QoS 1, persistent session, reconnecting) publishes at a fixed rate
while the fault happens; afterwards the checker compares the msg_ids the broker acknowledged
(PUBACK) with the rows in telemetry_raw: lost = acknowledged but not stored, duplicates = stored
more than once. One JSON line per fault; `--write-docs` puts the figures into docs/validation.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
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
from devtools.services import NatsCluster, ServerHandle, start_mosquitto, start_nats, start_nats_cluster
from devtools.supervisor import BRIDGE_READY, INGEST_READY, Child, ChildError, Supervisor, log_says, manage
from telemetry.jetstream import DEADLETTER_STREAM, INGEST_CONSUMER, TELEMETRY_STREAM, nats_servers

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
    # What a cluster fault measured besides the counts (e.g. seconds until publishing resumed).
    details: dict[str, float] = field(default_factory=dict)

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
        } | ({"details": self.details} if self.details else {})


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
        nc = await nats.connect(nats_servers(nats_url))
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
    # The pipeline around it: nats-servers (more than one: a JetStream cluster, streams R3),
    # runbridge copies (more than one: an MQTT shared subscription) and runingest copies (one durable).
    nats_nodes: int = 1
    bridges: int = 1
    ingesters: int = 1

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


# --------------------------------------------------------------------------- faults in a cluster

RESUME_LIMIT = 15.0  # seconds from a NATS node's death to publishes being stored again: a Raft election in
# nats-server 2.9 waits 4-9 s (its election timeout) after the leader falls silent
CATCH_UP_TIMEOUT = 60.0


@dataclass(frozen=True)
class StreamState:
    """The TELEMETRY stream as its leader sees it."""

    leader: str
    last_seq: int
    current: dict[str, bool]  # each follower's name -> whether it has caught up


def stream_state(urls: list[str], timeout: float = 1.0) -> StreamState | None:
    """TELEMETRY's leader and last sequence, asked through the nodes at `urls`; None while no
    leader answers (being elected, or no majority)."""

    async def ask() -> StreamState:
        nc = await nats.connect(urls, connect_timeout=1, allow_reconnect=False, max_reconnect_attempts=0)
        try:
            info = await nc.jetstream(timeout=timeout).stream_info(TELEMETRY_STREAM)
        finally:
            await nc.close()
        cluster = info.cluster
        return StreamState(
            leader=str(cluster.leader if cluster else ""),
            last_seq=int(info.state.last_seq),
            current={str(p.name): bool(p.current) for p in (cluster.replicas or [] if cluster else [])},
        )

    try:
        return asyncio.run(asyncio.wait_for(ask(), timeout + 2))
    except (nats.errors.Error, TimeoutError, OSError):
        return None


def consumer_counts(urls: list[str]) -> tuple[int, int]:
    """The ingest consumer's (deliveries awaiting their ack, redeliveries so far). Every message
    of the work-queue stream goes to this one consumer, so deliveries beyond the last stream
    sequence delivered are redeliveries (`num_redelivered` counts only those not yet acknowledged)."""

    async def ask() -> tuple[int, int]:
        nc = await nats.connect(urls, connect_timeout=2)
        try:
            info = await nc.jetstream().consumer_info(TELEMETRY_STREAM, INGEST_CONSUMER)
            delivered = info.delivered
            redelivered = (delivered.consumer_seq or 0) - (delivered.stream_seq or 0) if delivered else 0
            return int(info.num_ack_pending or 0), int(redelivered)
        finally:
            await nc.close()

    return asyncio.run(ask())


def _live_urls(cluster: NatsCluster) -> list[str]:
    return [node.url for node in cluster.nodes if node.running()]


def _node_of(cluster: NatsCluster, server_name: str) -> int:
    """The index of the node called `server_name` (start_nats_cluster names them <name>-n1, …)."""
    return int(server_name.rsplit("-n", 1)[1]) - 1


def _wait_state(run: FaultRun, timeout: float = 30.0) -> StreamState:
    assert run.cluster is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = stream_state(_live_urls(run.cluster))
        if state is not None and state.leader:
            return state
        time.sleep(0.2)
    raise FaultError(f"no leader of {TELEMETRY_STREAM} answered within {timeout:.0f} s")


def _kill_leader_until_resumed(run: FaultRun, down: float, label: str) -> None:
    """SIGKILL the stream leader's node; measure how long until a new leader stores new publishes
    (seconds in details[label]); start the node again (same store) after `down` seconds."""
    cluster = run.cluster
    assert cluster is not None
    index = _node_of(cluster, _wait_state(run).leader)
    cluster.kill(index)
    killed = time.monotonic()
    elected: StreamState | None = None
    resumed = None
    while time.monotonic() - killed < max(down, RESUME_LIMIT) and resumed is None:
        state = stream_state(_live_urls(cluster))
        if state is not None and state.leader:
            if elected is None:
                elected = state  # a new leader answers; what it has is everything up to now
            elif state.last_seq > elected.last_seq:
                resumed = time.monotonic() - killed  # and it stores publishes made after that
        time.sleep(0.1)
    if resumed is None:
        run.problems.append(f"{label}: no new publish stored within {RESUME_LIMIT:.0f} s of killing the leader")
    else:
        run.details[label] = round(resumed, 1)
    time.sleep(max(0.0, down - (time.monotonic() - killed)))
    cluster.start(index)


def _nats_node_kill(run: FaultRun) -> None:
    _kill_leader_until_resumed(run, run.fault.during, "publishing_resumed_s")


def _nats_node_empty_restart(run: FaultRun) -> None:
    """A follower's node killed, its store deleted, started again: it must catch up; then the
    leader is killed, so the stream goes on only if the restarted node really holds it."""
    cluster = run.cluster
    assert cluster is not None
    state = _wait_state(run)
    follower = next(name for name in state.current if name != state.leader)
    index = _node_of(cluster, follower)
    cluster.kill(index)
    time.sleep(run.fault.during)
    restarted = time.monotonic()
    cluster.start(index, empty=True)  # returns once its /healthz says it is current
    while time.monotonic() - restarted < CATCH_UP_TIMEOUT:
        now = stream_state(_live_urls(cluster))
        if now is not None and now.current.get(follower):
            run.details["caught_up_s"] = round(time.monotonic() - restarted, 1)
            break
        time.sleep(0.2)
    else:
        run.problems.append(f"{follower} restarted empty had not caught up after {CATCH_UP_TIMEOUT:.0f} s")
        return
    _kill_leader_until_resumed(run, 5.0, "resumed_after_leader_kill_s")


def _outage_of(run: FaultRun, name: str, stop: Callable[[Child], None], resume: Callable[[Child], None]) -> None:
    """Take one of two copies out for `during` seconds; the other must carry on meanwhile."""
    child = run.child(name)
    before, sent_before = run.stored(), run.sent()
    stop(child)
    time.sleep(run.fault.during)
    run.details["sent_while_one_was_out"] = run.sent() - sent_before
    run.details["stored_while_one_was_out"] = run.stored() - before
    if run.details["stored_while_one_was_out"] == 0:
        run.problems.append(f"nothing stored while {name} was out: the other copy did not carry on")
    resume(child)


def _start_again(child: Child) -> None:
    child.log_path = child.log_path.with_name(f"{child.log_path.stem}-{uuid.uuid4().hex[:4]}.log")
    child.start()
    child.wait_ready(READY_TIMEOUT)


def _bridge_kill_one_of_two(run: FaultRun) -> None:
    # Started again under the same client id: Mosquitto gives a shared subscription's messages to
    # a member's persistent session even while it is away, and only that member gets them.
    _outage_of(run, "runbridge#2", lambda child: child.kill(), _start_again)


def _consumer_stop_one_of_two(run: FaultRun) -> None:
    urls = nats_servers(run.nats_url)
    child = run.child("runingest#2")
    before = consumer_counts(urls)[1]
    # Stopped while it holds deliveries: SIGSTOP, and if after half a second nothing awaits its
    # ack (the other consumer acknowledges its own batches in milliseconds), SIGCONT and try
    # again, for up to 10 s. `redelivered` then says how many JetStream gave to the other.
    deadline = time.monotonic() + 10
    while True:
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(0.5)
        if consumer_counts(urls)[0] > 0 or time.monotonic() > deadline:
            break
        os.kill(child.pid, signal.SIGCONT)
        time.sleep(0.05)
    _outage_of(run, "runingest#2", lambda child: None, lambda child: os.kill(child.pid, signal.SIGCONT))
    run.details["redelivered"] = consumer_counts(urls)[1] - before


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
        Fault(
            "nats-node-kill",
            "A three-node JetStream cluster (streams R3): the node leading the telemetry stream SIGKILLed "
            "during 1,000 msg/s, started again on its store 10 s later. A new leader must store new "
            f"publishes within {RESUME_LIMIT:.0f} s (details: publishing_resumed_s).",
            1000,
            5,
            10,
            5,
            _nats_node_kill,
            nats_nodes=3,
        ),
        Fault(
            "bridge-kill-one-of-two",
            "Two runbridge on one MQTT shared subscription, three NATS nodes: one bridge SIGKILLed during "
            "500 msg/s, started again (same client id) 10 s later. The other must store messages meanwhile.",
            500,
            5,
            10,
            5,
            _bridge_kill_one_of_two,
            nats_nodes=3,
            bridges=2,
        ),
        Fault(
            "consumer-stop-one-of-two",
            "Two runingest on the one durable consumer, three NATS nodes: one SIGSTOPped for 15 s during "
            "500 msg/s (past its 10 s ack wait, so JetStream redelivers what it held to the other), then SIGCONT.",
            500,
            5,
            15,
            5,
            _consumer_stop_one_of_two,
            {"ARGUS_INGEST_ACK_WAIT_SECONDS": "10"},
            nats_nodes=3,
            ingesters=2,
        ),
        Fault(
            "nats-node-empty-restart",
            "Three NATS nodes: a follower of the telemetry stream SIGKILLed during 500 msg/s, its store "
            "deleted, started again 5 s later; once it has caught up, the leader is SIGKILLed for 5 s, so "
            "the stream goes on only if the restarted node holds it.",
            500,
            5,
            5,
            15,
            _nats_node_empty_restart,
            nats_nodes=3,
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
        self.details: dict[str, float] = {}
        self.broker: ServerHandle | None = None
        self.nats: ServerHandle | None = None
        self.cluster: NatsCluster | None = None
        self.nats_url = ""
        self.pipeline: Supervisor | None = None
        self.device: SimulatedDevice | None = None
        self.prefix = f"{self.run_id}-"

    @staticmethod
    def names(command: str, copies: int) -> list[str]:
        """Child names: `runbridge`, then `runbridge#2`, `runbridge#3`, …"""
        return [command] + [f"{command}#{i}" for i in range(2, copies + 1)]

    def sent(self) -> int:
        """This run's messages the device has sent so far."""
        return len(self.device.sent) if self.device is not None else 0

    def stored(self) -> int:
        """This run's messages stored so far."""
        return len(stored_counts(self.schema, self.logical_id, self.prefix))

    def child(self, name: str) -> Child:
        assert self.pipeline is not None
        return self.pipeline.child(name)

    def run(self) -> Outcome:
        started = time.monotonic()
        fault = self.fault
        self.broker = start_mosquitto(workdir=self.log_dir / "mosquitto")
        if fault.nats_nodes > 1:
            self.cluster = start_nats_cluster(fault.nats_nodes, self.log_dir / "nats-cluster")
            self.nats_url = self.cluster.url
        else:
            self.nats = start_nats(workdir=self.log_dir / "nats")
            self.nats_url = self.nats.url
        env = dict(self.base_env)
        env.update(
            MQTT_URL=self.broker.url,
            NATS_URL=self.nats_url,
            ARGUS_STREAM_REPLICAS=str(min(fault.nats_nodes, 3)),
            ARGUS_BRIDGE_CLIENT_ID=f"argus-faults-{self.run_id}",
            # Two or more bridges split the device topic between them (one MQTT shared subscription).
            ARGUS_BRIDGE_SHARE_GROUP=f"argus-faults-{self.run_id}" if fault.bridges > 1 else "",
            ARGUS_BRIDGE_METRICS_PORT="0",
            ARGUS_INGEST_METRICS_PORT="0",
            ARGUS_CELERY_METRICS_PORT="0",
            ARGUS_BRIDGE_DEVICE_RATE="0",
            **fault.env,
        )
        self.pipeline = Supervisor(self.log_dir, env)
        for name in self.names("runingest", fault.ingesters):
            self.pipeline.add(name, manage("runingest"), log_says(INGEST_READY))
        for index, name in enumerate(self.names("runbridge", fault.bridges)):
            bridge = self.pipeline.add(name, manage("runbridge"), log_says(BRIDGE_READY))
            if index:
                # Its own persistent session: the broker keeps each member's share apart.
                bridge.env = env | {"ARGUS_BRIDGE_CLIENT_ID": f"argus-faults-{self.run_id}-{index + 1}"}
        self.pipeline.start()
        self.pipeline.wait_ready(READY_TIMEOUT)
        self.log(f"{fault.name}: pipeline ready; {fault.rate:g} msg/s for {fault.seconds:g} s, logs in {self.log_dir}")

        device = self.device = SimulatedDevice(self.broker.url, f"faults-device-{self.run_id}", self.logical_id)
        prefix = self.prefix
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
        deadletters = deadletter_count(self.nats_url)
        if deadletters:
            self.problems.append(f"{deadletters} dead letters")
        for child in self.pipeline.children:
            if not child.running():
                self.problems.append(f"{child.name} not running at the end")
        outcome.problems = self.problems
        outcome.details = self.details
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
            bridges = [c.name for c in self.pipeline.children if c.name.startswith("runbridge")]
            for child in self.pipeline.children:
                if child.running():
                    # One left stopped (SIGSTOP) by a failed run would never see the SIGTERM.
                    os.kill(child.pid, signal.SIGCONT)
            codes = self.pipeline.stop([bridges], STOP_TIMEOUT)
            self.log(f"{self.fault.name}: exit codes {codes}")
        for server in (self.broker, self.nats):
            if server is not None:
                server.stop()
        if self.cluster is not None:
            self.cluster.stop()


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
