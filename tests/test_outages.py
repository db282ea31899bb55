"""Outages of the services the pipeline needs, on real processes and servers (issue 11, item 3).

The database outage: PostgreSQL refuses and drops every connection to the test database for
30 s (`ALLOW_CONNECTIONS false` and `pg_terminate_backend`, repeated, from a superuser session on
another database) while a device publishes 100 msg/s. For runbridge and runingest this is the
server being down: each connection they hold is lost, and each new one is refused.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from django.db import connection
from django.test import Client
from django_tenants.utils import schema_context

from devices.services import api_key_create
from devtools.faults import database_down
from devtools.services import ServerHandle, start_redis
from telemetry.models import TelemetryRaw
from tests.conftest import TenantPersona, make_device, make_device_type
from tests.pipeline import Pipeline, Publisher, read_deadletters, wait_for

pytestmark = pytest.mark.integration

RATE = 100  # messages a second
BEFORE, OUTAGE, AFTER = 4.0, 30.0, 4.0  # seconds
# Longer than the tests' ARGUS_INGEST_MAX_DELIVER (3) deliveries of ARGUS_INGEST_ACK_WAIT_SECONDS (5).
REDIS_OUTAGE = 20.0


def stored_msg_ids(schema: str, logical_id: str) -> list[str]:
    with schema_context(schema):
        return [
            str(m) for m in TelemetryRaw.objects.filter(logical_identifier=logical_id).values_list("msg_id", flat=True)
        ]


def publish_at_rate(mqtt_url: str, logical_id: str, count: int, done: threading.Event) -> None:
    """`count` messages with msg_ids m-0, m-1, … at RATE a second; each acknowledged by the broker."""
    sender = Publisher(mqtt_url)
    try:
        started = time.monotonic()
        infos = []
        for i in range(count):
            delay = started + i / RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            infos.append(sender.send(logical_id, {"msg_id": f"m-{i}", "values": {"temperature": i % 100}}, wait=False))
        for info in infos:
            info.wait_for_publish(30)
        done.set()
    finally:
        sender.close()


def test_it_stores_everything_once_across_a_database_outage(
    broker: ServerHandle, nats_server: ServerHandle, live_db: None, alpha: TenantPersona, tmp_path: Path
) -> None:
    with schema_context(alpha.schema):
        device = make_device(make_device_type())
    logical_id = device.logical_identifier
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        test_pid = cursor.fetchone()[0]
    # Routes expire every second, so the bridge needs the database during the outage too.
    pipeline = Pipeline(broker, nats_server, tmp_path, {"ARGUS_BRIDGE_ROUTE_TTL_SECONDS": "1"}).start()
    count = int((BEFORE + OUTAGE + AFTER) * RATE)
    done = threading.Event()
    publisher = threading.Thread(target=publish_at_rate, args=(pipeline.mqtt_url, logical_id, count, done))
    try:
        publisher.start()
        time.sleep(BEFORE)
        with database_down(str(connection.settings_dict["NAME"]), test_pid):
            time.sleep(OUTAGE)
            assert pipeline.bridge.running(), pipeline.bridge.log()
            assert pipeline.ingest.running(), pipeline.ingest.log()
        publisher.join(AFTER + 30)
        assert done.is_set(), "the broker did not acknowledge every message"
        wait_for(
            lambda: len(stored_msg_ids(alpha.schema, logical_id)) >= count or not pipeline.ingest.running(),
            timeout=30,
            what=lambda: f"all {count} messages (have {len(stored_msg_ids(alpha.schema, logical_id))})",
        )
        time.sleep(1)  # anything redelivered late would show up now
        stored = stored_msg_ids(alpha.schema, logical_id)
        assert len(stored) == len(set(stored)), "duplicates"
        assert sorted(stored) == sorted(f"m-{i}" for i in range(count))
        assert read_deadletters(pipeline.nats_url) == []
        for process in (pipeline.bridge, pipeline.ingest):
            assert process.running(), process.log()
            text = process.log_text()
            assert text.count("database outage started") == 1, process.log()
            assert text.count("database outage ended") == 1, process.log()
    finally:
        publisher.join(60)
        if pipeline.bridge.running() or pipeline.ingest.running():
            pipeline.stop()


def test_it_answers_503_never_500_while_the_database_is_down(live_db: None, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        device = make_device(make_device_type())
    key = api_key_create(logical_id=device.logical_identifier)[1]
    try:
        with database_down(str(connection.settings_dict["NAME"]), keep_pid=0):
            time.sleep(0.5)  # our own connection is among those terminated
            # The public host (routing by credential) and a tenant's host both need the database.
            for host in ("devices.example.net", alpha.host):
                response = Client(HTTP_HOST=host).post(
                    "/api/v1/telemetry",
                    data=b'{"values": {"temperature": 1}}',
                    content_type="application/json",
                    HTTP_AUTHORIZATION=f"Api-Key {key}",
                )
                assert response.status_code == 503, response.content
                assert response["Content-Type"] == "application/problem+json"
                assert response.json()["type"] == "urn:argus:problem:database_unavailable"
                assert int(response["Retry-After"]) > 0
    finally:
        connection.close()


def test_it_stores_everything_once_while_redis_is_down(
    broker: ServerHandle, nats_server: ServerHandle, live_db: None, alpha: TenantPersona, tmp_path: Path
) -> None:
    # Redis holds the profile cache, the Celery queue and the invalidation channel; none of it may
    # cost a message. The devices start reporting while it is down, so their profiles are not in
    # any process's memory and must come from somewhere else than Redis.
    redis_server = start_redis(workdir=tmp_path / "redis")
    with schema_context(alpha.schema):
        device_type = make_device_type()
        devices = [make_device(device_type).logical_identifier for _ in range(3)]
    pipeline = Pipeline(broker, nats_server, tmp_path, {"REDIS_URL": redis_server.url}).start()
    count = int(REDIS_OUTAGE * RATE)
    try:
        redis_server.kill()
        threads, events = [], []
        for logical_id in devices:
            done = threading.Event()
            thread = threading.Thread(target=publish_at_rate, args=(pipeline.mqtt_url, logical_id, count // 3, done))
            thread.start()
            threads.append(thread)
            events.append(done)
        time.sleep(REDIS_OUTAGE)
        redis_server.restart(graceful=False)
        for thread in threads:
            thread.join(60)
        assert all(e.is_set() for e in events), "the broker did not acknowledge every message"
        wanted = count // 3 * len(devices)
        wait_for(
            lambda: sum(len(stored_msg_ids(alpha.schema, d)) for d in devices) >= wanted,
            timeout=60,
            what=lambda: f"{wanted} messages (have {sum(len(stored_msg_ids(alpha.schema, d)) for d in devices)})",
        )
        time.sleep(1)
        for logical_id in devices:
            stored = stored_msg_ids(alpha.schema, logical_id)
            assert sorted(stored) == sorted(f"m-{i}" for i in range(count // 3))
        assert read_deadletters(pipeline.nats_url) == []
        assert pipeline.bridge.running() and pipeline.ingest.running()
    finally:
        pipeline.stop()
        redis_server.stop()
