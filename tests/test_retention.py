"""Retention (telemetry/retention.py) and the daily raw partitions it drops: three days of raw and
history rows stored through the ingest service in tenants of their own, the task run, and what is
left counted day by day; redeliveries across midnight (telemetry/storage.py). Each test runs in a
transaction that is rolled back, the partitions it made and dropped included."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from unittest import mock

import orjson
import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone
from prometheus_client import REGISTRY

from argus.models import Organization
from argus.registry import current_schema, use_public_schema
from devices.models import Device
from telemetry.ingest import ingest_batch
from telemetry.messages import IncomingMessage
from telemetry.models import TelemetryChunk, TelemetryRaw, TelemetryTransaction, TransactionStatus
from telemetry.profiles import ProfileCache
from telemetry.retention import RetentionReport, retention_apply
from telemetry.tasks import partitions_ensure, retention_all, retention_tenant
from tests.conftest import TenantPersona, _ensure_tenant, make_device, make_device_type, unique_id

READINGS_PER_MESSAGE = 2
# Messages stored on each of the three days (2, 3 and 4: told apart in the counts).
PER_DAY = {3: 2, 2: 3, 1: 4}
# Farther ahead than the migration and the beat task go, so the test makes the last days.
PARTITION_TEST_DAYS_AHEAD = 20


@pytest.fixture(scope="module")
def retention_tenants(django_db_setup: Any, django_db_blocker: Any) -> dict[str, TenantPersona]:
    """Two tenants of their own (committed once): no other test's rows in their partitions."""
    with django_db_blocker.unblock():
        return {
            "own": _ensure_tenant("retention_own", "retention-own.test"),
            "platform": _ensure_tenant("retention_platform", "retention-platform.test"),
        }


@pytest.fixture
def in_tenant(db: None, retention_tenants: dict[str, TenantPersona]) -> Iterator[Any]:
    """Switch the (rolled back) test transaction into one of the retention tenants."""

    def enter(name: str) -> Organization:
        tenant = retention_tenants[name].tenant
        tenant.refresh_from_db()
        connection.set_tenant(tenant)  # type: ignore[attr-defined]
        return tenant

    try:
        yield enter
    finally:
        use_public_schema()


def today() -> date:
    return datetime.now(UTC).date()


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def message(device: Device, received_at: datetime, msg_id: str | None = None, key: str = "") -> IncomingMessage:
    document: dict[str, Any] = {
        "ts": int(received_at.timestamp() * 1000),
        "values": {"temperature": 20.0, "humidity": 50.0},
    }
    if msg_id is not None:
        document["msg_id"] = msg_id
    return IncomingMessage(
        key=key or unique_id("stream"),
        logical_id=device.logical_identifier,
        received_at=received_at,
        payload=orjson.dumps(document),
    )


def make_partitions(first_day: date, days: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT telemetry_raw_ensure_partitions(%s, %s)", [first_day, days])
        cursor.execute("SELECT telemetry_history_ensure_partitions(%s, %s)", [first_day, days])


def fill_three_days(device: Device) -> None:
    """PER_DAY messages on each of the last three whole days, through the ingest service."""
    make_partitions(today() - timedelta(days=3), 3)
    profiles = ProfileCache()
    for days_ago, count in PER_DAY.items():
        noon = midnight(today() - timedelta(days=days_ago)) + timedelta(hours=12)
        messages = [message(device, noon + timedelta(minutes=i)) for i in range(count)]
        assert ingest_batch(messages=messages, profiles=profiles).accepted == count


def partitions(table: str) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = %s::regclass",
            [table],
        )
        return {row[0] for row in cursor.fetchall()}


def rows_per_day(table: str, column: str) -> dict[int, int]:
    """days ago -> rows, of the last four days."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT %s::date - ({column} AT TIME ZONE 'UTC')::date, count(*) FROM {table} "
            f"WHERE {column} >= %s GROUP BY 1",
            [today(), midnight(today() - timedelta(days=4))],
        )
        return {int(days_ago): count for days_ago, count in cursor.fetchall()}


def day_partition(table: str, days_ago: int) -> str:
    return f"{table}_p{today() - timedelta(days=days_ago):%Y%m%d}"


def dropped(report: RetentionReport) -> set[str]:
    return {p.partition for p in report.partitions}


def counter(name: str, table: str) -> float:
    return REGISTRY.get_sample_value(name, {"table": table}) or 0.0


def test_it_drops_exactly_the_expired_days(in_tenant: Any) -> None:
    in_tenant("own")
    device = make_device(make_device_type(metrics=["temperature", "humidity"]))
    fill_three_days(device)
    assert rows_per_day("telemetry_raw", "received_at") == {3: 2, 2: 3, 1: 4}
    assert rows_per_day("telemetry_history", "time") == {3: 4, 2: 6, 1: 8}
    rows_before = counter("argus_retention_rows_dropped_total", "telemetry_raw")
    bytes_before = counter("argus_retention_bytes_dropped_total", "telemetry_history")

    # Two days back from now lies inside the day before yesterday: only the day before it is
    # wholly older.
    report = retention_apply(retention_days=2)

    assert {day_partition("telemetry_raw", 3), day_partition("telemetry_history", 3)} <= dropped(report)
    assert not any(p >= f"telemetry_raw_p{today() - timedelta(days=2):%Y%m%d}" for p in dropped(report) if "raw" in p)
    for table in ("telemetry_raw", "telemetry_history"):
        left = partitions(table)
        assert day_partition(table, 3) not in left
        assert {day_partition(table, 2), day_partition(table, 1), day_partition(table, 0)} <= left
        assert f"{table}_default" in left
    assert rows_per_day("telemetry_raw", "received_at") == {2: 3, 1: 4}
    assert rows_per_day("telemetry_history", "time") == {2: 6, 1: 8}
    # The figures: rows from reltuples after ANALYZE (exact at this size), bytes from the
    # partition's size with its indexes; logged, returned and counted.
    assert (report.rows("telemetry_raw"), report.rows("telemetry_history")) == (2, 4)
    assert report.bytes("telemetry_raw") > 0 and report.bytes("telemetry_history") > 0
    assert report.summary()["raw_rows"] == 2
    assert counter("argus_retention_rows_dropped_total", "telemetry_raw") == rows_before + 2
    assert counter("argus_retention_bytes_dropped_total", "telemetry_history") > bytes_before

    # Run again: nothing more is due.
    again = retention_apply(retention_days=2)
    assert (again.rows("telemetry_raw"), again.rows("telemetry_history")) == (0, 0)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE telemetry_raw SET reason = 'tampered'",
        "DELETE FROM telemetry_raw",
        "TRUNCATE telemetry_raw",
        "UPDATE {partition} SET reason = 'tampered'",
        "DELETE FROM {partition}",
        "TRUNCATE {partition}",
        "TRUNCATE telemetry_raw_default",
    ],
)
def test_it_leaves_the_raw_rows_append_only(in_tenant: Any, statement: str) -> None:
    in_tenant("own")
    fill_three_days(make_device(make_device_type()))
    retention_apply(retention_days=2)
    sql = statement.format(partition=day_partition("telemetry_raw", 2))
    with pytest.raises(Exception, match="append-only") as excinfo, transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(sql)
    assert type(excinfo.value.__cause__).__name__ == "InsufficientPrivilege"
    assert rows_per_day("telemetry_raw", "received_at") == {2: 3, 1: 4}


def test_it_keeps_the_tenants_own_retention_or_else_the_platforms(in_tenant: Any) -> None:
    own = in_tenant("own")
    own.retention_days = 2
    own.save(update_fields=["retention_days"])
    fill_three_days(make_device(make_device_type()))
    with override_settings(ARGUS_RETENTION_DAYS=1):
        summary = retention_tenant()
    assert summary["raw_rows"] == 2
    assert rows_per_day("telemetry_raw", "received_at") == {2: 3, 1: 4}

    platform = in_tenant("platform")
    assert platform.retention_days is None
    fill_three_days(make_device(make_device_type()))
    with override_settings(ARGUS_RETENTION_DAYS=1):
        summary = retention_tenant()
    assert (summary["raw_rows"], summary["history_rows"]) == (5, 10)
    assert rows_per_day("telemetry_raw", "received_at") == {1: 4}
    assert rows_per_day("telemetry_history", "time") == {1: 8}


def test_it_runs_in_every_tenant_from_beat(db: None, retention_tenants: dict[str, TenantPersona]) -> None:
    assert settings.CELERY_BEAT_SCHEDULE["retention"]["task"] == "telemetry.tasks.retention_all"
    schemas: list[str] = []
    with mock.patch.object(retention_tenant, "delay", side_effect=lambda: schemas.append(current_schema())):
        count = retention_all()
    assert count == len(schemas)
    assert {"retention_own", "retention_platform"} <= set(schemas)
    assert "public" not in schemas


def test_it_refuses_a_retention_out_of_bounds() -> None:
    for days in (0, 3651):
        with pytest.raises(ValidationError):
            Organization(schema_name="bounds", name="bounds", retention_days=days).clean_fields()
    Organization(schema_name="bounds", name="bounds", retention_days=3650).clean_fields()


def test_it_drops_expired_rows_outside_the_daily_partitions(in_tenant: Any) -> None:
    in_tenant("own")
    device = make_device(make_device_type())
    fill_three_days(device)
    # Older than every daily partition: into the default partitions (a backlog, back-filled readings).
    old = midnight(today() - timedelta(days=40)) + timedelta(hours=1)
    assert ingest_batch(messages=[message(device, old)], profiles=ProfileCache()).accepted == 1
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM telemetry_raw_default")
        assert cursor.fetchone() == (1,)
    report = retention_apply(retention_days=2)
    assert "telemetry_raw_default" in dropped(report)
    assert report.history_default_rows == 2
    assert (report.rows("telemetry_raw"), report.rows("telemetry_history")) == (3, 6)
    # An empty default partition took its place, with its guards.
    assert "telemetry_raw_default" in partitions("telemetry_raw")
    assert not TelemetryRaw.objects.filter(received_at__lt=midnight(today() - timedelta(days=3))).exists()
    with pytest.raises(Exception, match="append-only"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE telemetry_raw_default")
    assert ingest_batch(messages=[message(device, old + timedelta(seconds=1))], profiles=ProfileCache()).accepted == 1


def test_it_prunes_finished_transactions_older_than_the_retention(in_tenant: Any) -> None:
    in_tenant("own")
    device = make_device(make_device_type())
    now = timezone.now()
    long_ago = now - timedelta(days=5)

    def tx(status: str, at: datetime) -> TelemetryTransaction:
        return TelemetryTransaction.objects.create(
            device=device,
            transaction_id=unique_id("tx"),
            status=status,
            expected_chunks=2,
            first_chunk_at=at,
            last_chunk_at=at,
            expires_at=at + timedelta(minutes=5),
        )

    old_complete = tx(TransactionStatus.COMPLETE, long_ago)
    old_expired = tx(TransactionStatus.EXPIRED, long_ago)
    old_pending = tx(TransactionStatus.PENDING, long_ago)  # the chunk sweeper's to expire first
    recent = tx(TransactionStatus.COMPLETE, now)
    TelemetryChunk.objects.create(
        transaction=old_expired, chunk_index=0, payload=b"x", raw_id=1, received_at=long_ago, expires_at=long_ago
    )
    report = retention_apply(retention_days=2)
    assert (report.transactions, report.chunks) == (2, 1)
    left = set(TelemetryTransaction.objects.filter(device=device).values_list("pk", flat=True))
    assert left == {old_pending.pk, recent.pk}
    assert old_complete.pk not in left


def test_it_creates_raw_partitions_ahead_as_for_history(in_tenant: Any) -> None:
    in_tenant("own")
    ahead = PARTITION_TEST_DAYS_AHEAD
    assert partitions_ensure(ahead) >= 2  # the farthest day of each table is new
    last = today() + timedelta(days=ahead)
    for table in ("telemetry_raw", "telemetry_history"):
        assert f"{table}_p{last:%Y%m%d}" in partitions(table)
    part = f"telemetry_raw_p{last:%Y%m%d}"
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = %s "
            "AND indexdef LIKE 'CREATE UNIQUE%%'",
            [part],
        )
        assert sorted(row[0].split(" USING ")[1] for row in cursor.fetchall()) == [
            "btree (id, received_at)",
            "btree (ingest_key)",
        ]
        cursor.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass ORDER BY 1", [part])
        assert [row[0] for row in cursor.fetchall()] == ["telemetry_raw_no_truncate", "telemetry_raw_no_update_delete"]
    assert partitions_ensure(ahead) == 0


# --- Redeliveries across midnight (telemetry/storage.py) --------------------------------------


@pytest.mark.parametrize("first_before_midnight", [True, False])
def test_it_stores_a_message_redelivered_across_midnight_once(in_tenant: Any, first_before_midnight: bool) -> None:
    in_tenant("own")
    device = make_device(make_device_type())
    boundary = midnight(today())
    before, after = boundary - timedelta(seconds=10), boundary + timedelta(seconds=20)
    first, second = (before, after) if first_before_midnight else (after, before)
    profiles = ProfileCache()
    # The bridge received the message twice (a restart before its MQTT ack): two stream ids and
    # receive times, one on each side of midnight, in two day partitions.
    stored = ingest_batch(messages=[message(device, first, msg_id="m-1")], profiles=profiles)
    again = ingest_batch(messages=[message(device, second, msg_id="m-1")], profiles=profiles)
    assert (stored.accepted, again.accepted, again.duplicates) == (1, 0, 1)
    assert TelemetryRaw.objects.filter(logical_identifier=device.logical_identifier).count() == 1
    # Another message id is another message, near midnight too.
    assert ingest_batch(messages=[message(device, second, msg_id="m-2")], profiles=profiles).accepted == 1


def test_it_stores_a_message_redelivered_the_same_day_once(in_tenant: Any) -> None:
    in_tenant("own")
    device = make_device(make_device_type())
    noon = midnight(today()) + timedelta(hours=12)
    profiles = ProfileCache()
    assert ingest_batch(messages=[message(device, noon, msg_id="m-1")], profiles=profiles).accepted == 1
    # The same stream message again (a JetStream redelivery: same key, same receive time) and
    # the device's retry an hour later: both absorbed by the day partition's unique key.
    key = TelemetryRaw.objects.get(logical_identifier=device.logical_identifier).ingest_key
    assert key.endswith("/m/m-1")
    later = ingest_batch(
        messages=[message(device, noon, msg_id="m-1"), message(device, noon + timedelta(hours=1), msg_id="m-1")],
        profiles=profiles,
    )
    assert (later.accepted, later.duplicates) == (0, 2)


@override_settings(ARGUS_RAW_DEDUPE_WINDOW_SECONDS=60)
def test_it_looks_across_midnight_only_within_the_window(in_tenant: Any) -> None:
    in_tenant("own")
    device = make_device(make_device_type())
    boundary = midnight(today())
    profiles = ProfileCache()
    # Ten minutes apart across midnight, beyond a window of a minute: two rows (docs/retention.md).
    assert ingest_batch(
        messages=[message(device, boundary - timedelta(minutes=5), msg_id="m-1")], profiles=profiles
    ).accepted
    assert ingest_batch(
        messages=[message(device, boundary + timedelta(minutes=5), msg_id="m-1")], profiles=profiles
    ).accepted
    assert TelemetryRaw.objects.filter(logical_identifier=device.logical_identifier).count() == 2


def test_it_stores_copies_stored_at_once_on_both_sides_of_midnight_once(live_db: None, alpha: TenantPersona) -> None:
    # Two runingest processes, each with one copy: the first holds its transaction open; the
    # second waits for the first's lock on the key, then finds its row. (Committed: raw rows
    # cannot be cleaned up, so this runs in alpha, whose rows no count here depends on.)
    connection.set_tenant(alpha.tenant)  # type: ignore[attr-defined]
    device = make_device(make_device_type())
    boundary = midnight(today())
    first_stored = threading.Event()
    release = threading.Event()
    outcome: dict[str, int] = {}

    def store(name: str, at: datetime, hold: bool) -> None:
        connection.set_tenant(alpha.tenant)  # type: ignore[attr-defined]
        try:
            with transaction.atomic():
                result = ingest_batch(messages=[message(device, at, msg_id="m-1")], profiles=ProfileCache())
                outcome[name] = result.accepted
                if hold:
                    first_stored.set()
                    release.wait(10)
        finally:
            connection.close()

    first = threading.Thread(target=store, args=("first", boundary - timedelta(seconds=5), True))
    second = threading.Thread(target=store, args=("second", boundary + timedelta(seconds=5), False))
    first.start()
    assert first_stored.wait(10)
    second.start()
    second.join(1.0)
    assert second.is_alive(), "the second copy did not wait for the first's transaction"
    release.set()
    first.join(10)
    second.join(10)
    assert outcome == {"first": 1, "second": 0}
    assert TelemetryRaw.objects.filter(logical_identifier=device.logical_identifier).count() == 1


# --- The migration (telemetry/migrations/0006_raw_partitions.py) -------------------------------

OLD_RAW = """
CREATE TABLE telemetry_raw (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    logical_identifier varchar(128) NOT NULL,
    msg_id varchar(200),
    ingest_key varchar(400) NOT NULL CONSTRAINT telemetry_raw_ingest_key_uniq UNIQUE,
    payload bytea NOT NULL,
    received_at timestamptz NOT NULL,
    stored_at timestamptz NOT NULL,
    transport varchar(10) NOT NULL,
    status varchar(20) NOT NULL,
    reason text NOT NULL,
    readings integer NOT NULL CONSTRAINT telemetry_raw_readings_check CHECK (readings >= 0),
    device_id bigint
);
CREATE INDEX telemetry_raw_device_recv_idx ON telemetry_raw (device_id, received_at DESC);
CREATE INDEX telemetry_raw_status_idx ON telemetry_raw (status, received_at DESC)
    WHERE NOT (status::text = ANY (ARRAY['accepted', 'chunk']));
CREATE TABLE telemetry_transactions (id bigint PRIMARY KEY, status varchar(10), expires_at timestamptz);
CREATE TABLE telemetry_chunks (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    transaction_id bigint,
    raw_id bigint NOT NULL REFERENCES telemetry_raw (id) DEFERRABLE INITIALLY DEFERRED
);
"""

INSERT_RAW = (
    "INSERT INTO telemetry_raw (logical_identifier, ingest_key, payload, received_at, stored_at, transport, "
    "status, reason, readings) VALUES ('D', %s, '', %s, now(), 'mqtt', 'accepted', '', 0) "
)


def test_it_keeps_every_row_of_the_raw_table_it_partitions(db: None) -> None:
    migration = importlib.import_module("telemetry.migrations.0006_raw_partitions")
    append_only = importlib.import_module("telemetry.migrations.0002_history_partitions_raw_append_only")
    days = [midnight(today() - timedelta(days=d)) + timedelta(hours=3) for d in (3, 1, 0)]
    # A schema of its own with telemetry_raw as migration 0005 left it, rolled back with the test.
    with connection.cursor() as cursor:
        cursor.execute("CREATE SCHEMA migration_0006_test")
    connection.set_schema("migration_0006_test")  # type: ignore[attr-defined]
    with connection.cursor() as cursor:
        cursor.execute(OLD_RAW)
        cursor.execute(append_only.APPEND_ONLY)
        cursor.execute(append_only.HISTORY)
        for i, at in enumerate(days):
            cursor.execute(INSERT_RAW, [f"key-{i}", at])
        cursor.execute("INSERT INTO telemetry_chunks (raw_id) SELECT min(id) FROM telemetry_raw")

        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # no check may be pending when the key goes
        cursor.execute(migration.ENSURE)
        cursor.execute(migration.CONVERT)

        cursor.execute("SELECT tableoid::regclass::text, ingest_key FROM telemetry_raw ORDER BY id")
        assert cursor.fetchall() == [("telemetry_raw_legacy", f"key-{i}") for i in range(3)]
        tomorrow = today() + timedelta(days=1)
        assert f"telemetry_raw_p{tomorrow:%Y%m%d}" in partitions("telemetry_raw")
        assert "telemetry_raw_default" in partitions("telemetry_raw")
        # Ids go on from the old sequence; the former table still refuses its keys a second time.
        cursor.execute(INSERT_RAW + "RETURNING id", ["key-3", days[-1]])
        new_id = cursor.fetchone()[0]
        cursor.execute("SELECT max(id) FROM telemetry_raw WHERE ingest_key <> 'key-3'")
        assert new_id > cursor.fetchone()[0]
        cursor.execute(INSERT_RAW + "ON CONFLICT DO NOTHING RETURNING id", ["key-0", days[-1]])
        assert cursor.fetchall() == []
        cursor.execute(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'telemetry_chunks'::regclass AND contype = 'f'"
        )
        assert cursor.fetchone() == (0,)
        for statement in ("UPDATE telemetry_raw_legacy SET reason = 'x'", "TRUNCATE telemetry_raw_legacy"):
            with pytest.raises(Exception, match="append-only"), transaction.atomic():
                cursor.execute(statement)

        # The hourly upkeep makes only the days the former table does not cover.
        cursor.execute("SELECT telemetry_raw_ensure_partitions(%s, 11)", [today() - timedelta(days=1)])
        assert cursor.fetchone() == (1,)

        # The former table goes whole once its last day (today) is older than the retention.
        kept = retention_apply(retention_days=2)
        assert "telemetry_raw_legacy" not in dropped(kept)
        gone = retention_apply(retention_days=2, now=timezone.now() + timedelta(days=3))
        assert "telemetry_raw_legacy" in dropped(gone)
        assert gone.rows("telemetry_raw") == 4
