"""Work that follows a committed batch, handed to Celery: reassembly of completed chunked
transactions, and the `batch_committed` hook (assets: alerts and health scores), one task per
batch, not per message."""

from __future__ import annotations

import logging

from django_tenants.utils import schema_context

from telemetry import hooks
from telemetry.live import live_presence, live_stored
from telemetry.messages import BatchResult

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
    live_stored(schema, messages=result.accepted, readings=result.readings, latest=result.latest)
    if result.presence:
        live_presence(schema, result.presence)
    try:
        with schema_context(schema):
            hooks.batch_committed(result.latest)
    except Exception:
        # The readings are stored; scores catch up on the periodic recompute.
        log.exception("could not hand on follow-up work schema=%s devices=%d", schema, len(result.latest))
