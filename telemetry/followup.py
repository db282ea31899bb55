"""Work that follows a committed batch: threshold alerts and health scores, one task per batch."""

from __future__ import annotations

import logging

from django_tenants.utils import schema_context

from telemetry.ingest import BatchResult

log = logging.getLogger(__name__)


def enqueue_followups(schema: str, result: BatchResult) -> None:
    """Hand the newest values per device of a committed batch to the Celery workers."""
    if not result.latest:
        return
    from assets.tasks import evaluate_latest_values

    latest = {str(device_id): [time.isoformat(), values] for device_id, (time, values) in result.latest.items()}
    try:
        with schema_context(schema):
            evaluate_latest_values.delay(latest)
    except Exception:
        # The readings are stored; alerts and scores catch up on the periodic recompute.
        log.exception("could not enqueue follow-up work schema=%s devices=%d", schema, len(latest))
