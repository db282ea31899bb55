"""Retention of the current tenant's telemetry (docs/retention.md): whole daily partitions of
`telemetry_history` and `telemetry_raw` whose every row is older than the tenant's retention are
detached and dropped, expired rows of history's default partition deleted, and finished chunked
transactions with their chunks pruned. The figures are logged and counted for Prometheus (the
counters live in the process running the task: the Celery worker).

Dropping a partition is the only way raw rows ever leave: the database refuses UPDATE, DELETE and
TRUNCATE of them on every partition, while DETACH and DROP TABLE are DDL, which only this module
issues.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg
from django.db import connection, transaction
from django.db.backends.utils import CursorWrapper
from django.utils import timezone
from prometheus_client import Counter

from argus.registry import current_schema

log = logging.getLogger(__name__)

ROWS_DROPPED = Counter(
    "argus_retention_rows_dropped_total",
    "Rows removed by retention (dropped partitions: pg_class.reltuples after ANALYZE; others: counted)",
    ["table"],
)
BYTES_DROPPED = Counter(
    "argus_retention_bytes_dropped_total",
    "Bytes of dropped partitions (pg_total_relation_size: table, indexes and TOAST)",
    ["table"],
)

RAW = "telemetry_raw"
HISTORY = "telemetry_history"
TRANSACTIONS = "telemetry_transactions"
CHUNKS = "telemetry_chunks"
# Finished transactions are deleted this many at a time, each batch in its own short transaction.
PRUNE_BATCH = 5000
# DETACH takes an exclusive lock on the parent table for an instant; waiting behind a long
# reader would stop ingest behind it, so give up after this long and try again next run.
LOCK_TIMEOUT = "5s"


@dataclass(frozen=True, slots=True)
class DroppedPartition:
    """One partition removed: which, and its size just before."""

    table: str
    partition: str
    rows: int
    bytes: int


@dataclass
class RetentionReport:
    """What one run removed from one tenant."""

    schema: str
    retention_days: int
    cutoff: datetime
    partitions: list[DroppedPartition] = field(default_factory=list)
    # Partitions due but left for the next run (their table was locked beyond LOCK_TIMEOUT).
    skipped: list[str] = field(default_factory=list)
    history_default_rows: int = 0
    transactions: int = 0
    chunks: int = 0

    def rows(self, table: str) -> int:
        dropped = sum(p.rows for p in self.partitions if p.table == table)
        if table == HISTORY:
            dropped += self.history_default_rows
        return dropped + {TRANSACTIONS: self.transactions, CHUNKS: self.chunks}.get(table, 0)

    def bytes(self, table: str) -> int:
        return sum(p.bytes for p in self.partitions if p.table == table)

    def summary(self) -> dict[str, int]:
        return {
            "raw_partitions": sum(1 for p in self.partitions if p.table == RAW),
            "raw_rows": self.rows(RAW),
            "raw_bytes": self.bytes(RAW),
            "history_partitions": sum(1 for p in self.partitions if p.table == HISTORY),
            "history_rows": self.rows(HISTORY),
            "history_bytes": self.bytes(HISTORY),
            "transactions": self.transactions,
            "chunks": self.chunks,
            "skipped": len(self.skipped),
        }


def retention_apply(*, retention_days: int, now: datetime | None = None) -> RetentionReport:
    """Remove the current tenant's telemetry older than `retention_days` days before `now`."""
    if retention_days < 1:
        raise ValueError(f"retention_days must be at least 1, not {retention_days}")
    cutoff = (now or timezone.now()) - timedelta(days=retention_days)
    report = RetentionReport(schema=current_schema(), retention_days=retention_days, cutoff=cutoff)
    for table in (HISTORY, RAW):
        for partition, upper in _partitions(table):
            if upper is not None and upper <= cutoff:
                _drop_partition(report, table, partition)
    _expire_raw_default(report)
    report.history_default_rows = _expire_history_default(cutoff)
    report.transactions, report.chunks = _prune_transactions(cutoff)
    for table in (RAW, HISTORY, TRANSACTIONS, CHUNKS):
        ROWS_DROPPED.labels(table=table).inc(report.rows(table))
        BYTES_DROPPED.labels(table=table).inc(report.bytes(table))
    log.info(
        "retention %s (%d days, before %s): %s: %d partitions, ~%d rows, %d bytes; %s: %d partitions, "
        "~%d rows, %d bytes; %d finished transactions, %d chunks%s",
        report.schema,
        retention_days,
        cutoff.isoformat(timespec="seconds"),
        RAW,
        sum(1 for p in report.partitions if p.table == RAW),
        report.rows(RAW),
        report.bytes(RAW),
        HISTORY,
        sum(1 for p in report.partitions if p.table == HISTORY),
        report.rows(HISTORY),
        report.bytes(HISTORY),
        report.transactions,
        report.chunks,
        f"; left for the next run (locked): {', '.join(report.skipped)}" if report.skipped else "",
    )
    return report


def _partitions(table: str) -> list[tuple[str, datetime | None]]:
    """The table's partitions with each one's upper bound (None: the default partition)."""
    with connection.cursor() as cursor:
        cursor.execute(
            r"""
            SELECT c.relname,
                   (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = to_regclass(%s)
            ORDER BY 2 NULLS LAST
            """,
            [table],
        )
        return [(name, upper) for name, upper in cursor.fetchall()]


def _drop_partition(report: RetentionReport, table: str, partition: str) -> None:
    """Measure, detach and drop one partition, in one transaction."""
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT set_config('lock_timeout', %s, true)", [LOCK_TIMEOUT])
            rows, size = _measure(cursor, partition)
            _detach_drop(cursor, table, partition)
    except psycopg.errors.LockNotAvailable:
        _skip(report, partition)
        return
    report.partitions.append(DroppedPartition(table=table, partition=partition, rows=rows, bytes=size))


def _measure(cursor: CursorWrapper, partition: str) -> tuple[int, int]:
    """A partition's rows and bytes (table, indexes and TOAST)."""
    # reltuples after ANALYZE: exact for a partition of up to 30,000 pages (ANALYZE reads them
    # all), a close estimate beyond; a count(*) would read a whole day of raw rows.
    cursor.execute(f'ANALYZE "{partition}"')
    cursor.execute(
        "SELECT GREATEST(reltuples, 0)::bigint, pg_total_relation_size(oid) FROM pg_class WHERE oid = %s::regclass",
        [f'"{partition}"'],
    )
    row = cursor.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _detach_drop(cursor: CursorWrapper, table: str, partition: str) -> None:
    # Not DETACH ... CONCURRENTLY: it refuses a table with a default partition, and runs outside
    # a transaction. The plain one holds the parent exclusively for an instant.
    cursor.execute(f'ALTER TABLE {table} DETACH PARTITION "{partition}"')
    cursor.execute(f'DROP TABLE "{partition}"')


def _skip(report: RetentionReport, partition: str) -> None:
    log.warning("retention %s: %s locked for over %s, left for the next run", report.schema, partition, LOCK_TIMEOUT)
    report.skipped.append(partition)


def _expire_raw_default(report: RetentionReport) -> None:
    """Drop raw's default partition (rows outside every daily one) once all of its rows expired,
    and put an empty one in its place: its rows cannot be deleted one by one."""
    partition = "telemetry_raw_default"
    expired = (
        "SELECT EXISTS (SELECT 1 FROM telemetry_raw_default) "
        "AND NOT EXISTS (SELECT 1 FROM telemetry_raw_default WHERE received_at >= %s)"
    )
    with connection.cursor() as cursor:
        cursor.execute(expired, [report.cutoff])
        row = cursor.fetchone()
        if not (row and row[0]):
            return
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT set_config('lock_timeout', %s, true)", [LOCK_TIMEOUT])
            rows, size = _measure(cursor, partition)
            # Checked again with inserts held off: a row stored since must not go with the rest.
            cursor.execute(f"LOCK TABLE {RAW} IN ACCESS EXCLUSIVE MODE")
            cursor.execute(expired, [report.cutoff])
            row = cursor.fetchone()
            if not (row and row[0]):
                return
            _detach_drop(cursor, RAW, partition)
            cursor.execute(f"CREATE TABLE {partition} PARTITION OF {RAW} DEFAULT")
            cursor.execute("SELECT telemetry_raw_partition_guard(%s)", [partition])
    except psycopg.errors.LockNotAvailable:
        _skip(report, partition)
        return
    report.partitions.append(DroppedPartition(table=RAW, partition=partition, rows=rows, bytes=size))


def _expire_history_default(cutoff: datetime) -> int:
    """Delete expired readings of history's default partition (late or back-filled readings,
    older than the oldest daily partition), which holds days of every age and is never dropped."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("DELETE FROM telemetry_history_default WHERE time < %s", [cutoff])
        return int(cursor.rowcount)


def _prune_transactions(cutoff: datetime) -> tuple[int, int]:
    """Delete finished (complete, expired, failed) chunked transactions that expired before the
    cutoff, with any chunks left; pending ones are the chunk sweeper's. Returns (transactions, chunks)."""
    transactions = chunks = 0
    while True:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                "SELECT id FROM telemetry_transactions WHERE status <> 'pending' AND expires_at < %s LIMIT %s",
                [cutoff, PRUNE_BATCH],
            )
            ids = [row[0] for row in cursor.fetchall()]
            if not ids:
                return transactions, chunks
            cursor.execute("DELETE FROM telemetry_chunks WHERE transaction_id = ANY(%s)", [ids])
            chunks += cursor.rowcount
            cursor.execute("DELETE FROM telemetry_transactions WHERE id = ANY(%s)", [ids])
            transactions += cursor.rowcount
        if len(ids) < PRUNE_BATCH:
            return transactions, chunks
