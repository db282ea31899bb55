"""Chunked gateway transactions end to end (docs/ingestion.md): Mosquitto → runbridge → JetStream →
runingest → PostgreSQL, then a real Celery worker (Redis broker) reassembles and Celery beat
expires and re-enqueues. No mocks: every process is a child process against the test database.

The sweep runs every second, transactions expire 0.5 s after their TTL and complete
transactions whose reassembly task was lost are enqueued again after 3 s (CHUNK_ENV).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from django.db.models import Count
from django_tenants.utils import schema_context

from devices.models import Device, DeviceRole, DeviceType, ProcessingMode
from devtools.services import ServerHandle
from telemetry.models import RawStatus, TelemetryChunk, TelemetryHistory, TelemetryRaw, TelemetryTransaction
from tests.conftest import TenantPersona, make_device, make_device_type, unique_id
from tests.pipeline import Celery, Pipeline, database_url, publisher, wait_for

pytestmark = pytest.mark.integration

BEACONS = 2000
CHUNK_SIZE = 30
TOTAL = 67  # ceil(2000 / 30)
CHUNK_ENV = {
    "ARGUS_CHUNK_SWEEP_SECONDS": "1",
    "ARGUS_CHUNK_EXPIRY_GRACE_SECONDS": "0.5",
    "ARGUS_CHUNK_REENQUEUE_SECONDS": "3",
}


@pytest.fixture
def chunked(broker: ServerHandle, nats_server: ServerHandle, live_db: None, tmp_path: Path) -> Iterator[Pipeline]:
    """runbridge + runingest + a Celery worker (2 processes) + beat; all stopped with SIGTERM."""
    pipeline = Pipeline(broker, nats_server, tmp_path, extra_env=CHUNK_ENV)
    celery = Celery(pipeline.env, tmp_path)
    pipeline.celery = celery  # type: ignore[attr-defined]
    try:
        pipeline.start()
        celery.start()
        yield pipeline
    finally:
        try:
            celery.stop()
        finally:
            pipeline.stop()


def celery_of(pipeline: Pipeline) -> Celery:
    celery: Celery = pipeline.celery  # type: ignore[attr-defined]
    return celery


def chunked_type(**overrides: Any) -> DeviceType:
    values: dict[str, Any] = {
        "processing_mode": ProcessingMode.GATEWAY_CHUNKED,
        "metrics": ["rssi"],
        "auto_register_children": True,
        "max_children": 5000,
        "max_chunks": 100,
        "message_schema": {},
    }
    values.update(overrides)
    return make_device_type(**values)


def make_gateway(device_type: DeviceType) -> Device:
    return make_device(device_type, device_role=DeviceRole.GATEWAY, logical_identifier=unique_id("BLE-GW"))


def build_chunks(*, beacons: int = BEACONS, transaction_id: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """One 2000-beacon report as 67 chunk documents (in index order), one metric per beacon."""
    transaction_id = transaction_id or uuid.uuid4().hex
    prefix = unique_id("BEACON")
    ids = [f"{prefix}-{i:04d}" for i in range(beacons)]
    total = -(-beacons // CHUNK_SIZE)
    ts = int(time.time() * 1000)
    chunks = [
        {
            "msg_id": f"{transaction_id}-{index}",
            "transaction_id": transaction_id,
            "chunk": index,
            "total": total,
            "ts": ts,
            "children": [
                {"id": child, "values": {"rssi": -40 - (n % 50)}}
                for n, child in enumerate(ids[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE])
            ],
        }
        for index in range(total)
    ]
    return transaction_id, chunks


def transaction_of(schema: str, transaction_id: str) -> TelemetryTransaction | None:
    with schema_context(schema):
        return TelemetryTransaction.objects.filter(transaction_id=transaction_id).first()


def wait_for_status(schema: str, transaction_id: str, status: str, timeout: float = 30) -> TelemetryTransaction:
    def check() -> TelemetryTransaction | None:
        tx = transaction_of(schema, transaction_id)
        return tx if tx is not None and tx.status == status else None

    found = wait_for(check, timeout=timeout, what=f"transaction {transaction_id} to be {status}")
    assert found is not None
    return found


def children_readings(schema: str, gateway: Device) -> int:
    with schema_context(schema):
        children = Device.objects.filter(parent_device=gateway).values("id")
        return TelemetryHistory.objects.filter(device_id__in=children).count()


def raw_rows(schema: str, logical_id: str) -> list[TelemetryRaw]:
    with schema_context(schema):
        return list(TelemetryRaw.objects.filter(logical_identifier=logical_id).order_by("id"))


def chunk_rows(schema: str, tx: TelemetryTransaction) -> int:
    with schema_context(schema):
        return TelemetryChunk.objects.filter(transaction_id=tx.pk).count()


def assert_complete_once(schema: str, gateway: Device, transaction_id: str) -> TelemetryTransaction:
    """Complete, all 2000 readings stored once under auto-registered children, chunks gone."""
    tx = wait_for_status(schema, transaction_id, "complete")
    assert tx.received_chunks == tx.expected_chunks == TOTAL
    assert tx.readings == BEACONS
    assert tx.completed_at is not None and tx.completed_at >= tx.last_chunk_at
    assert children_readings(schema, gateway) == BEACONS
    with schema_context(schema):
        children = Device.objects.filter(parent_device=gateway)
        assert children.count() == BEACONS
        assert all(c.device_role == DeviceRole.CHILD for c in children)
    assert chunk_rows(schema, tx) == 0
    return tx


# --- Complete transactions ------------------------------------------------------------------------


def test_it_reassembles_in_order_chunks_into_2000_readings(chunked: Pipeline, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        gateway = make_gateway(chunked_type())
    transaction_id, chunks = build_chunks()
    with publisher(chunked.mqtt_url) as sender:
        for chunk in chunks:
            sender.send(gateway.logical_identifier, chunk)
    tx = assert_complete_once(alpha.schema, gateway, transaction_id)

    rows = raw_rows(alpha.schema, gateway.logical_identifier)
    assert len(rows) == TOTAL and {r.status for r in rows} == {RawStatus.CHUNK}
    assert sorted(r.msg_id or "" for r in rows) == sorted(c["msg_id"] for c in chunks)
    with schema_context(alpha.schema):
        # Every reading is traceable to the chunk's raw row that carried it.
        by_raw = dict(
            TelemetryHistory.objects.filter(raw_id__in=[r.pk for r in rows])
            .values_list("raw_id")
            .annotate(n=Count("*"))
        )
    assert sum(by_raw.values()) == BEACONS and len(by_raw) == TOTAL
    assert tx.first_chunk_at <= tx.last_chunk_at


def test_it_completes_once_from_shuffled_and_repeated_chunks(chunked: Pipeline, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        gateway = make_gateway(chunked_type())
    transaction_id, chunks = build_chunks()
    rng = random.Random(4)
    order = list(range(TOTAL))
    rng.shuffle(order)
    last = order.pop()  # held back so every repeat arrives while the transaction is pending
    same_msg_id = rng.sample(order, 5)
    no_msg_id = rng.sample([i for i in order if i not in same_msg_id], 5)
    with publisher(chunked.mqtt_url) as sender:
        for n, index in enumerate(order):
            sender.send(gateway.logical_identifier, chunks[index])
            if n % 7 == 0:  # some repeats straight away, possibly within the same ingest batch
                sender.send(gateway.logical_identifier, chunks[index])
        for index in same_msg_id:
            sender.send(gateway.logical_identifier, chunks[index])
        for index in no_msg_id:
            sender.send(gateway.logical_identifier, {k: v for k, v in chunks[index].items() if k != "msg_id"})
        wait_for(
            lambda: len(raw_rows(alpha.schema, gateway.logical_identifier)) == TOTAL - 1 + len(no_msg_id),
            what="the pending chunks and repeats",
        )
        pending = transaction_of(alpha.schema, transaction_id)
        assert pending is not None and pending.status == "pending" and pending.received_chunks == TOTAL - 1
        sender.send(gateway.logical_identifier, chunks[last])
        assert_complete_once(alpha.schema, gateway, transaction_id)
        # Repeats after completion: one without msg_id is recorded and ignored, one with is absorbed.
        sender.send(gateway.logical_identifier, {k: v for k, v in chunks[0].items() if k != "msg_id"})
        sender.send(gateway.logical_identifier, chunks[1])
        wait_for(
            lambda: len(raw_rows(alpha.schema, gateway.logical_identifier)) == TOTAL + len(no_msg_id) + 1,
            what="the late repeat",
        )
    time.sleep(1)  # a second reassembly or a stray row would show up now
    rows = raw_rows(alpha.schema, gateway.logical_identifier)
    assert sorted(r.msg_id or "" for r in rows if r.status == RawStatus.CHUNK) == sorted(c["msg_id"] for c in chunks)
    ignored = [r for r in rows if r.status == RawStatus.IGNORED]
    assert len(ignored) == len(no_msg_id) + 1 and all(r.msg_id is None for r in ignored)
    assert sum("was already received" in r.reason for r in ignored) == len(no_msg_id)
    assert sum("is already complete" in r.reason for r in ignored) == 1
    tx = assert_complete_once(alpha.schema, gateway, transaction_id)
    assert tx.readings == BEACONS


def test_it_completes_interleaved_transactions_of_two_gateways_independently(
    chunked: Pipeline, alpha: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        device_type = chunked_type()
        first, second = make_gateway(device_type), make_gateway(device_type)
    first_id, first_chunks = build_chunks()
    second_id, second_chunks = build_chunks()
    with publisher(chunked.mqtt_url) as sender:
        for a, b in zip(first_chunks, reversed(second_chunks), strict=True):
            sender.send(first.logical_identifier, a, wait=False)
            sender.send(second.logical_identifier, b, wait=False).wait_for_publish(10)
    assert_complete_once(alpha.schema, first, first_id)
    assert_complete_once(alpha.schema, second, second_id)
    with schema_context(alpha.schema):
        assert not Device.objects.filter(
            parent_device=first, logical_identifier__in=[c["id"] for chunk in second_chunks for c in chunk["children"]]
        ).exists()


# --- Expiry ---------------------------------------------------------------------------------------


def test_it_expires_a_transaction_with_a_missing_chunk_and_stores_nothing(
    chunked: Pipeline, alpha: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        gateway = make_gateway(chunked_type(chunk_ttl_seconds=2))
    transaction_id, chunks = build_chunks()
    missing = 41
    with publisher(chunked.mqtt_url) as sender:
        for chunk in chunks:
            if chunk["chunk"] != missing:
                sender.send(gateway.logical_identifier, chunk)
        wait_for(
            lambda: (t := transaction_of(alpha.schema, transaction_id)) is not None and t.received_chunks == TOTAL - 1,
            what="66 chunks",
        )
        pending = transaction_of(alpha.schema, transaction_id)
        assert pending is not None and pending.status == "pending" and chunk_rows(alpha.schema, pending) == TOTAL - 1
        tx = wait_for_status(alpha.schema, transaction_id, "expired", timeout=15)
        assert tx.missing_chunks == [missing]
        assert tx.received_chunks == TOTAL - 1 and tx.readings == 0
        assert "TTL passed with 66 of 67 chunks" in tx.reason
        assert chunk_rows(alpha.schema, tx) == 0
        assert children_readings(alpha.schema, gateway) == 0
        with schema_context(alpha.schema):
            assert not Device.objects.filter(parent_device=gateway).exists()

        # The missing chunk, too late: recorded, ignored, nothing stored.
        sender.send(gateway.logical_identifier, chunks[missing])
        late = wait_for(
            lambda: [
                r for r in raw_rows(alpha.schema, gateway.logical_identifier) if r.msg_id == chunks[missing]["msg_id"]
            ],
            what="the late chunk's raw row",
        )[0]
    assert late.status == RawStatus.IGNORED and "already expired" in late.reason
    time.sleep(1.5)  # a sweep runs every second: it must not revive or store anything
    again = transaction_of(alpha.schema, transaction_id)
    assert again is not None and again.status == "expired" and again.missing_chunks == [missing]
    assert children_readings(alpha.schema, gateway) == 0
    assert chunk_rows(alpha.schema, tx) == 0


# --- Crash during reassembly ----------------------------------------------------------------------


def backend_waiting_on(sql_prefix: str) -> bool:
    with psycopg.connect(database_url()) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            [f"%{sql_prefix}%"],
        ).fetchone()
        return bool(row and row[0])


def test_it_completes_once_when_the_worker_is_killed_during_reassembly(chunked: Pipeline, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        gateway = make_gateway(chunked_type())
    transaction_id, chunks = build_chunks()
    # One beacon exists already; holding its row lock stops the reassembly after it has
    # inserted the 2000 readings (uncommitted) and while it marks the children as heard from.
    first_beacon = chunks[0]["children"][0]["id"]
    with schema_context(alpha.schema):
        beacon = Device.objects.create(
            device_type=gateway.device_type,
            name="known beacon",
            logical_identifier=first_beacon,
            device_role=DeviceRole.CHILD,
            parent_device=gateway,
        )
    celery = celery_of(chunked)
    blocker = psycopg.connect(database_url(), autocommit=False)
    try:
        blocker.execute(f'SET search_path TO "{alpha.schema}"')
        blocker.execute("SELECT id FROM devices WHERE id = %s FOR UPDATE", [beacon.pk])
        with publisher(chunked.mqtt_url) as sender:
            for chunk in chunks:
                sender.send(gateway.logical_identifier, chunk)
        wait_for(
            lambda: "Task telemetry.tasks.reassemble_transaction[" in celery.worker.log()
            and backend_waiting_on("UPDATE devices SET last_seen"),
            what="the reassembly to hold its 2000 uncommitted readings",
        )
        celery.worker.kill()
    finally:
        blocker.rollback()
        blocker.close()
    pending = transaction_of(alpha.schema, transaction_id)
    assert pending is not None and pending.status == "pending" and pending.received_chunks == TOTAL
    # The killed worker's database session rolls back once it notices the client is gone.
    wait_for(lambda: not backend_waiting_on("UPDATE devices SET last_seen"), what="the orphaned session to end")
    assert children_readings(alpha.schema, gateway) == 0

    # Redelivery of the unacknowledged message waits for Redis' visibility timeout; the
    # sweeper enqueues the complete-but-unassembled transaction again well before that.
    celery.start_worker()
    assert_complete_once(alpha.schema, gateway, transaction_id)
    wait_for(lambda: "re-enqueued 1 complete transactions" in celery.worker.full_log(), what="the sweeper's re-enqueue")
    time.sleep(3.5)  # another sweep period: no second reassembly, no second set of readings
    assert children_readings(alpha.schema, gateway) == BEACONS
    assert celery.worker.full_log().count(f"transaction complete schema={alpha.schema} id={transaction_id}") == 1


# --- Bad input ------------------------------------------------------------------------------------


def test_it_rejects_bad_chunks_with_reasons_without_harming_a_good_transaction(
    chunked: Pipeline, alpha: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        device_type = chunked_type(max_chunks=100)
        gateway = make_gateway(device_type)
        intruder = make_gateway(device_type)
    transaction_id, chunks = build_chunks()
    stray_beacon = unique_id("BEACON")
    beacon = {"children": [{"id": stray_beacon, "values": {"rssi": -50}}], "ts": chunks[0]["ts"]}
    bad = {
        "index-too-high": (
            gateway,
            {"msg_id": "bad-high", "transaction_id": transaction_id, "chunk": TOTAL, "total": TOTAL, **beacon},
            f"chunk must be an integer in 0..{TOTAL - 1}",
        ),
        "index-negative": (
            gateway,
            {"msg_id": "bad-neg", "transaction_id": transaction_id, "chunk": -1, "total": TOTAL, **beacon},
            f"chunk must be an integer in 0..{TOTAL - 1}",
        ),
        "total-disagrees": (
            gateway,
            {"msg_id": "bad-total", "transaction_id": transaction_id, "chunk": 3, "total": TOTAL - 1, **beacon},
            f"total {TOTAL - 1} disagrees with {TOTAL}",
        ),
        "total-above-limit": (
            gateway,
            {"msg_id": "bad-limit", "transaction_id": uuid.uuid4().hex, "chunk": 0, "total": 101, **beacon},
            "total 101 exceeds the type's limit of 100 chunks",
        ),
        "other-device": (
            intruder,
            {"msg_id": "bad-owner", "transaction_id": transaction_id, "chunk": 5, "total": TOTAL, **beacon},
            f"transaction_id {transaction_id} belongs to another device",
        ),
    }
    with publisher(chunked.mqtt_url) as sender:
        sender.send(gateway.logical_identifier, chunks[0])  # the transaction exists before the bad ones
        wait_for(lambda: transaction_of(alpha.schema, transaction_id), what="the transaction")
        bad_items = list(bad.values())
        for i, chunk in enumerate(chunks[1:]):
            sender.send(gateway.logical_identifier, chunk)
            if i % 12 == 0 and bad_items:
                device, document, _ = bad_items.pop()
                sender.send(device.logical_identifier, document)
    tx = assert_complete_once(alpha.schema, gateway, transaction_id)
    assert tx.device_id == gateway.pk

    for name, (device, document, reason) in bad.items():
        # Matched by bytes: a chunk the adapter refuses is stored without its msg_id.
        payload = orjson.dumps(document)
        rows = wait_for(
            lambda d=device, p=payload: [  # type: ignore[misc]
                r for r in raw_rows(alpha.schema, d.logical_identifier) if bytes(r.payload) == p
            ],
            what=f"the raw row of {name}",
        )
        assert len(rows) == 1, name
        assert rows[0].status == RawStatus.REJECTED, (name, rows[0].status, rows[0].reason)
        assert reason in rows[0].reason, (name, rows[0].reason)
    with schema_context(alpha.schema):
        assert not TelemetryTransaction.objects.filter(transaction_id=bad["total-above-limit"][1]["transaction_id"])
        assert not Device.objects.filter(logical_identifier=stray_beacon).exists()
        assert not TelemetryTransaction.objects.filter(device=intruder).exists()


def test_it_fails_a_transaction_whose_reassembled_whole_is_invalid(chunked: Pipeline, alpha: TenantPersona) -> None:
    # Each chunk alone satisfies both types' schemas; the checks apply to the reassembled whole.
    with schema_context(alpha.schema):
        bad_child_gateway = make_gateway(chunked_type())
        too_many_gateway = make_gateway(
            chunked_type(message_schema={"type": "object", "properties": {"children": {"maxItems": BEACONS - 1}}})
        )
    bad_child_tx, bad_child_chunks = build_chunks()
    bad_child_chunks[12]["children"][3]["values"]["rssi"] = "strong"
    too_many_tx, too_many_chunks = build_chunks()
    with publisher(chunked.mqtt_url) as sender:
        for bad_child_chunk, too_many_chunk in zip(bad_child_chunks, too_many_chunks, strict=True):
            sender.send(bad_child_gateway.logical_identifier, bad_child_chunk)
            sender.send(too_many_gateway.logical_identifier, too_many_chunk)

    bad_child = wait_for_status(alpha.schema, bad_child_tx, "failed")
    assert bad_child.reason == "chunk 12: children[3].values.rssi is not a number"
    too_many = wait_for_status(alpha.schema, too_many_tx, "failed")
    assert too_many.reason.startswith("reassembled message: schema: children:")
    for gateway, tx in ((bad_child_gateway, bad_child), (too_many_gateway, too_many)):
        assert tx.readings == 0
        assert children_readings(alpha.schema, gateway) == 0
        assert chunk_rows(alpha.schema, tx) == 0
        # The chunks themselves stay on record, byte for byte.
        assert [r.status for r in raw_rows(alpha.schema, gateway.logical_identifier)] == [RawStatus.CHUNK] * TOTAL
