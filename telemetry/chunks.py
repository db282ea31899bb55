"""Chunked gateway messages: admission of chunks, atomic reassembly, expiry.

One logical gateway message arrives as `total` chunks sharing a `transaction_id`. Each chunk
is stored (raw row + `telemetry_chunks`) and counted on its `telemetry_transactions` row, which
is locked while counting so concurrent consumers never lose an update. When the last chunk is
committed, a Celery task reassembles the transaction: every reading of every chunk is written
in one database transaction, or none is. A transaction whose TTL passes first expires.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone
from prometheus_client import Counter

from argus.registry import current_schema
from argus.sql import copy_rows
from devices.models import ProcessingMode
from telemetry.adapters import ADAPTERS, Decoded, Rejected, check_times
from telemetry.children import resolve_children
from telemetry.messages import BatchResult, IncomingMessage, Prepared, safe_text
from telemetry.models import RawStatus, TelemetryTransaction, TransactionStatus
from telemetry.storage import write_readings

if TYPE_CHECKING:
    from telemetry.profiles import ProfileCache

log = logging.getLogger(__name__)

TRANSACTIONS = Counter("argus_chunk_transactions_total", "Chunked transactions by final status", ["status"])


@dataclass(slots=True)
class Admission:
    """A chunk accepted for storage in a pending transaction."""

    item: Prepared
    transaction_pk: int
    index: int
    stored_before: int  # chunks of its transaction already stored when the lock was taken


def chunks_admit(items: list[Prepared]) -> list[Admission]:
    """Decide each chunk's fate under a lock on its transaction (creating new transactions).

    Sets the outcome of refused chunks (rejected, or ignored when their transaction is already
    finished or the chunk is a repeat) before their raw rows are written.
    """
    if not items:
        return []
    first: dict[str, Prepared] = {}
    for item in items:
        assert item.decoded is not None and item.decoded.chunk is not None
        first.setdefault(item.decoded.chunk.transaction_id, item)
    ids = sorted(first)
    with connection.cursor() as cursor:
        # New transactions, inserted in id order so concurrent consumers lock in one order.
        rows = []
        for tx_id in ids:
            item = first[tx_id]
            assert item.device and item.device_type and item.decoded and item.decoded.chunk
            received = item.message.received_at
            rows.append(
                (
                    item.device.id,
                    tx_id,
                    item.decoded.chunk.total,
                    received,
                    received + timedelta(seconds=item.device_type.chunk_ttl_seconds),
                )
            )
        cursor.execute(
            """
            INSERT INTO telemetry_transactions (device_id, transaction_id, status, expected_chunks, received_chunks,
                first_chunk_at, last_chunk_at, expires_at, readings, reason)
            SELECT d, t, 'pending', e, 0, f, f, x, 0, ''
            FROM unnest(%s::bigint[], %s::text[], %s::int[], %s::timestamptz[], %s::timestamptz[])
                AS v(d, t, e, f, x)
            ORDER BY t
            ON CONFLICT (transaction_id) DO NOTHING
            """,
            [list(col) for col in zip(*rows, strict=True)],
        )
        cursor.execute(
            "SELECT id, transaction_id, device_id, status, expected_chunks, expires_at FROM telemetry_transactions "
            "WHERE transaction_id = ANY(%s) ORDER BY transaction_id FOR UPDATE",
            [ids],
        )
        transactions = {row[1]: row for row in cursor.fetchall()}
        cursor.execute(
            "SELECT transaction_id, chunk_index FROM telemetry_chunks WHERE transaction_id = ANY(%s)",
            [[row[0] for row in transactions.values()]],
        )
        present: dict[int, set[int]] = {}
        for tx_pk, index in cursor.fetchall():
            present.setdefault(tx_pk, set()).add(index)
    stored_before = {tx_pk: len(indexes) for tx_pk, indexes in present.items()}

    admissions: list[Admission] = []
    late: set[int] = set()
    for item in items:
        assert item.device and item.decoded and item.decoded.chunk
        chunk = item.decoded.chunk
        tx_pk, tx_id, device_id, status, expected, expires_at = transactions[chunk.transaction_id]
        have = present.setdefault(tx_pk, set())
        if device_id != item.device.id:
            item.reject(f"transaction_id {tx_id} belongs to another device")
        elif chunk.total != expected:
            item.reject(f"total {chunk.total} disagrees with {expected} of the transaction's earlier chunks")
        elif status != TransactionStatus.PENDING or tx_pk in late:
            item.set_outcome(
                RawStatus.IGNORED, f"transaction {tx_id} is already {status if tx_pk not in late else 'expired'}"
            )
        elif item.message.received_at > expires_at:
            late.add(tx_pk)
            item.set_outcome(RawStatus.IGNORED, f"transaction {tx_id} expired before this chunk arrived")
        elif chunk.index in have:
            item.set_outcome(RawStatus.IGNORED, f"chunk {chunk.index} of {tx_id} was already received")
        else:
            have.add(chunk.index)
            admissions.append(
                Admission(item=item, transaction_pk=tx_pk, index=chunk.index, stored_before=stored_before.get(tx_pk, 0))
            )
    if late:
        transactions_expire(transaction_pks=sorted(late))
    return admissions


def chunks_store(admissions: list[Admission], inserted: dict[str, int]) -> list[int]:
    """Store admitted chunks whose raw rows were new; returns transactions now complete."""
    stored = [a for a in admissions if a.item.ingest_key in inserted]
    if not stored:
        return []
    rows = []
    for a in stored:
        received = a.item.message.received_at
        assert a.item.device_type is not None
        ttl = timedelta(seconds=a.item.device_type.chunk_ttl_seconds)
        rows.append(
            (a.transaction_pk, a.index, a.item.message.payload, inserted[a.item.ingest_key], received, received + ttl)
        )
    with connection.cursor() as cursor:
        copy_rows(
            cursor,
            "telemetry_chunks",
            "transaction_id, chunk_index, payload, raw_id, received_at, expires_at",
            ["int8", "int4", "bytea", "int8", "timestamptz", "timestamptz"],
            rows,
        )
        # The count is what was there under the lock plus what this batch stored: exact, since
        # the lock (held until commit) keeps every other writer of the transaction's chunks out,
        # and cheaper than counting the chunk rows again.
        counts: dict[int, tuple[int, datetime]] = {}
        for a in stored:
            count, last = counts.get(a.transaction_pk, (a.stored_before, a.item.message.received_at))
            counts[a.transaction_pk] = (count + 1, max(last, a.item.message.received_at))
        pks = sorted(counts)
        cursor.execute(
            """
            UPDATE telemetry_transactions t
            SET received_chunks = v.n, last_chunk_at = greatest(t.last_chunk_at, v.last)
            FROM unnest(%s::bigint[], %s::int[], %s::timestamptz[]) AS v(id, n, last)
            WHERE t.id = v.id
            RETURNING t.id, t.received_chunks, t.expected_chunks
            """,
            [pks, [counts[pk][0] for pk in pks], [counts[pk][1] for pk in pks]],
        )
        return [tx_pk for tx_pk, received, expected in cursor.fetchall() if received == expected]


def transactions_expire(*, transaction_pks: list[int] | None = None, grace_seconds: float = 0) -> list[int]:
    """Mark pending, incomplete transactions past their TTL expired and drop their chunks.

    With `transaction_pks`, those (already known to be late); otherwise every transaction whose
    TTL ended more than `grace_seconds` ago (the grace lets chunks received in time but still
    in the pipeline arrive first).
    """
    cutoff = timezone.now() - timedelta(seconds=grace_seconds)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            UPDATE telemetry_transactions t
            SET status = 'expired',
                reason = 'TTL passed with ' || t.received_chunks || ' of ' || t.expected_chunks || ' chunks',
                missing_chunks = to_jsonb(ARRAY(
                    SELECT i FROM generate_series(0, t.expected_chunks - 1) AS i
                    EXCEPT SELECT c.chunk_index FROM telemetry_chunks c WHERE c.transaction_id = t.id
                    ORDER BY 1))
            WHERE t.status = 'pending' AND t.received_chunks < t.expected_chunks
              AND (t.id = ANY(%s) OR (%s AND t.expires_at < %s))
            RETURNING t.id, t.transaction_id, t.received_chunks, t.expected_chunks
            """,
            [transaction_pks or [], transaction_pks is None, cutoff],
        )
        expired = cursor.fetchall()
    _chunks_delete([row[0] for row in expired])
    for _, tx_id, received, expected in expired:
        TRANSACTIONS.labels("expired").inc()
        log.info("transaction expired schema=%s id=%s chunks=%d/%d", current_schema(), tx_id, received, expected)
    return [row[0] for row in expired]


@dataclass
class ReassemblyOutcome:
    """What reassembling one transaction did."""

    status: str
    readings: int = 0
    reason: str = ""
    latest: dict[int, tuple[datetime, dict[str, float]]] = field(default_factory=dict)


def transaction_reassemble(*, transaction_pk: int, profiles: ProfileCache) -> ReassemblyOutcome:
    """Store every reading of a complete transaction at once (idempotent: a finished transaction
    is left as it is, so running twice, or on two workers at once, gives one result)."""
    schema = current_schema()
    with transaction.atomic():
        # of=("self",): locking the joined device row as well made ingest of the gateway's next
        # chunks wait for the whole reassembly (their foreign-key checks share-lock that row).
        tx = (
            TelemetryTransaction.objects.select_for_update(of=("self",))
            .select_related("device")
            .filter(pk=transaction_pk)
            .first()
        )
        if tx is None:
            return ReassemblyOutcome(status="missing")
        if tx.status != TransactionStatus.PENDING or tx.received_chunks < tx.expected_chunks:
            return ReassemblyOutcome(status=tx.status, reason="not ready" if tx.status == "pending" else "")
        chunks = _chunks_of(tx.pk)
        device = profiles.device(schema, tx.device.logical_identifier)
        device_type = profiles.device_type(schema, tx.device.device_type_id)
        assert device is not None and device_type is not None
        item = Prepared(
            message=IncomingMessage(
                key=tx.transaction_id, logical_id=device.logical_identifier, received_at=tx.first_chunk_at, payload=b""
            ),
            device=device,
            device_type=device_type,
        )
        raw_ids: list[int] = []
        try:
            if [index for index, _, _, _ in chunks] != list(range(tx.expected_chunks)):
                raise Rejected("chunks are missing although the count is complete")
            readings = []
            children = []
            header: dict[str, object] = {}
            for index, payload, raw_id, received_at in chunks:
                # A chunk is a gateway message with the chunk fields added: decoded as one, its
                # children are parsed here, once (admission only looked at the chunk fields).
                try:
                    decoded = ADAPTERS[device_type.protocol_adapter](
                        payload, ProcessingMode.GATEWAY, received_at, device_type.max_children
                    )
                    check_times(decoded, received_at)
                except Rejected as exc:
                    raise Rejected(f"chunk {index}: {exc.reason}") from None
                readings.extend(decoded.readings)
                children.extend(decoded.document["children"])
                header = header or _header_fields(decoded.document)
                raw_ids.extend([raw_id] * len(decoded.readings))
            if len(readings) > device_type.max_children:
                raise Rejected(f"{len(readings)} children, more than the type's limit of {device_type.max_children}")
            whole = {**header, "children": children}
            error = device_type.schema_error(whole)
            if error:
                raise Rejected(f"reassembled message: {error}")
            item.decoded = Decoded(document=whole, msg_id=None, readings=readings)
            registered = resolve_children([item], schema, profiles)
            if item.status != RawStatus.ACCEPTED:
                raise Rejected(item.reason)
            if item.refused:
                # Children refused one by one (another tenant's, say): the others are stored.
                refused = set(item.refused)
                raw_ids = [raw_id for index, raw_id in enumerate(raw_ids) if index not in refused]
        except Rejected as exc:
            tx.status = TransactionStatus.FAILED
            tx.reason = safe_text(exc.reason)
            tx.completed_at = timezone.now()
            tx.save(update_fields=["status", "reason", "completed_at"])
            _chunks_delete([tx.pk])
            TRANSACTIONS.labels("failed").inc()
            log.warning("transaction failed schema=%s id=%s reason=%s", schema, tx.transaction_id, exc.reason)
            return ReassemblyOutcome(status=TransactionStatus.FAILED, reason=exc.reason)
        result = BatchResult()
        write_readings(
            [
                (device_id, time, values, raw_id)
                for (device_id, time, values), raw_id in zip(item.rows, raw_ids, strict=True)
            ],
            result,
            {device.id: tx.last_chunk_at},
        )
        tx.status = TransactionStatus.COMPLETE
        tx.completed_at = timezone.now()
        tx.readings = result.readings
        tx.reason = item.reason
        tx.save(update_fields=["status", "completed_at", "readings", "reason"])
        _chunks_delete([tx.pk])
    for profile in registered:
        profiles.remember_device(schema, profile)
    TRANSACTIONS.labels("complete").inc()
    log.info(
        "transaction complete schema=%s id=%s chunks=%d readings=%d",
        schema,
        tx.transaction_id,
        tx.expected_chunks,
        result.readings,
    )
    return ReassemblyOutcome(status=TransactionStatus.COMPLETE, readings=result.readings, latest=result.latest)


def _chunks_of(transaction_pk: int) -> list[tuple[int, bytes, int, datetime]]:
    """(index, payload, raw id, received at) of a transaction's stored chunks, in index order."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT chunk_index, payload, raw_id, received_at FROM telemetry_chunks "
            "WHERE transaction_id = %s ORDER BY chunk_index",
            [transaction_pk],
        )
        return [(index, bytes(payload), raw_id, received_at) for index, payload, raw_id, received_at in cursor]


def _chunks_delete(transaction_pks: list[int]) -> None:
    """Drop the chunks of finished transactions.

    In SQL: the ORM's delete() loads every chunk, payload included, before deleting it, because
    django-tenants listens to post_delete for every model.
    """
    if transaction_pks:
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM telemetry_chunks WHERE transaction_id = ANY(%s)", [transaction_pks])


def _header_fields(document: dict[str, object]) -> dict[str, object]:
    """A chunk's fields other than its children and index (transaction_id, total, ts, ...)."""
    return {k: v for k, v in document.items() if k not in ("children", "chunk")}


def transactions_unassembled(*, older_than_seconds: float) -> list[int]:
    """Complete transactions still pending reassembly (a lost Celery message): to enqueue again."""
    cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
    return list(
        TelemetryTransaction.objects.filter(
            status=TransactionStatus.PENDING,
            received_chunks=F("expected_chunks"),
            last_chunk_at__lt=cutoff,
        ).values_list("pk", flat=True)
    )
