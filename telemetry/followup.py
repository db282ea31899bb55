"""Work that follows a committed batch, handed to Celery: reassembly of completed chunked
transactions, threshold alerts and health scores (one task per batch, not per message)."""

from __future__ import annotations

import logging
from datetime import datetime

from django_tenants.utils import schema_context

from telemetry.ingest import BatchResult

log = logging.getLogger(__name__)


def enqueue_followups(schema: str, result: BatchResult) -> None:
    """After a batch committed: reassemble what completed, evaluate the newest values."""
    from telemetry.tasks import reassemble_transaction

    try:
        with schema_context(schema):
            for transaction_pk in result.completed_transactions:
                reassemble_transaction.delay(transaction_pk)
    except Exception:
        # The chunks are stored and counted: the sweeper enqueues these again.
        log.exception("could not enqueue reassembly schema=%s transactions=%s", schema, result.completed_transactions)
    if result.latest:
        enqueue_evaluation(schema, result.latest)


def enqueue_evaluation(schema: str, latest: dict[int, tuple[datetime, dict[str, float]]]) -> None:
    """Hand the newest values per device to the alert and health task of the tenant."""
    from assets.tasks import evaluate_latest_values

    payload = {str(device_id): [time.isoformat(), values] for device_id, (time, values) in latest.items()}
    try:
        with schema_context(schema):
            evaluate_latest_values.delay(payload)
    except Exception:
        # The readings are stored; scores catch up on the periodic recompute.
        log.exception("could not enqueue follow-up work schema=%s devices=%d", schema, len(payload))
