"""Celery tasks of the telemetry pipeline (thin: they call services in telemetry.chunks and
telemetry.retention)."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings
from django.core.cache import cache
from django.db import connection

from argus.invalidation import register_process_cache
from argus.registry import current_schema, current_tenant, each_tenant_schema
from telemetry import hooks
from telemetry.chunks import transaction_reassemble, transactions_expire, transactions_unassembled
from telemetry.live import live_stored
from telemetry.profiles import ProfileCache
from telemetry.retention import retention_apply

log = logging.getLogger(__name__)

# One profile cache per worker process, kept fresh by Redis invalidations.
profiles = ProfileCache()
register_process_cache(profiles)


@shared_task(acks_late=True, reject_on_worker_lost=True, max_retries=None)
def reassemble_transaction(transaction_pk: int) -> str:
    """Reassemble one complete chunked transaction (in its tenant); safe to run twice."""
    outcome = transaction_reassemble(transaction_pk=transaction_pk, profiles=profiles)
    if outcome.readings:
        live_stored(current_schema(), messages=0, readings=outcome.readings, latest=outcome.latest)
    hooks.transaction_reassembled(outcome.latest)
    return outcome.status


@shared_task
def chunks_sweep_tenant(grace_seconds: float, unassembled_after_seconds: float) -> dict[str, int]:
    """Expire transactions past their TTL; enqueue again complete ones whose task was lost."""
    expired = transactions_expire(grace_seconds=grace_seconds)
    schema = current_schema()
    stale = []
    for transaction_pk in transactions_unassembled(older_than_seconds=unassembled_after_seconds):
        # Once per period per transaction: while the workers are behind, the queue already
        # holds it, and adding it again every sweep would only lengthen the queue.
        if cache.add(f"reassembly-requeued:{schema}:{transaction_pk}", 1, timeout=unassembled_after_seconds):
            reassemble_transaction.delay(transaction_pk)
            stale.append(transaction_pk)
    if stale:
        log.warning("re-enqueued %d complete transactions awaiting reassembly", len(stale))
    return {"expired": len(expired), "reenqueued": len(stale)}


@shared_task
def chunks_sweep_all() -> int:
    """Run the chunk sweep in every tenant (from beat, which runs in the public schema)."""
    count = 0
    for _schema in each_tenant_schema():
        chunks_sweep_tenant.delay(settings.ARGUS_CHUNK_EXPIRY_GRACE_SECONDS, settings.ARGUS_CHUNK_REENQUEUE_SECONDS)
        count += 1
    return count


def partitions_ensure(days_ahead: int) -> int:
    """Create the daily telemetry_history and telemetry_raw partitions of the current tenant from
    yesterday on."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT telemetry_history_ensure_partitions((now() AT TIME ZONE 'UTC')::date - 1, %s) "
            "+ telemetry_raw_ensure_partitions((now() AT TIME ZONE 'UTC')::date - 1, %s)",
            [days_ahead + 2, days_ahead + 2],
        )
        row = cursor.fetchone()
        return int(row[0]) if row else 0


@shared_task
def partitions_ensure_all() -> int:
    """Create tomorrow's (and the next days') partitions in every tenant."""
    created = 0
    for _schema in each_tenant_schema():
        created += partitions_ensure(settings.ARGUS_PARTITION_DAYS_AHEAD)
    return created


@shared_task
def retention_tenant() -> dict[str, int]:
    """Drop the current tenant's telemetry older than its retention (telemetry.retention)."""
    return retention_apply(retention_days=current_tenant().effective_retention_days).summary()


@shared_task
def retention_all() -> int:
    """Run retention in every tenant (from beat, which runs in the public schema)."""
    count = 0
    for _schema in each_tenant_schema():
        retention_tenant.delay()
        count += 1
    return count
