"""What assets do when telemetry is stored (named in settings.ARGUS_TELEMETRY_HOOKS; see
telemetry/hooks.py): alerts and health scores for the newest values, and assets'
last_telemetry_at."""

from __future__ import annotations

from datetime import datetime

from django.db import transaction

from assets.services import telemetry_evaluate
from assets.tasks import evaluate_latest_values, send_followups
from assets.values import assets_mark_heard, linked_devices
from telemetry.messages import LatestValues


def queue_evaluation(latest: LatestValues) -> None:
    """After an ingest batch: one Celery task for the devices that feed an asset. Only those
    have alerts or scores to evaluate: without the filter every batch queued a task, in line
    with the reassemblies, that found nothing to do."""
    linked = linked_devices(list(latest))
    if linked:
        evaluate_latest_values.delay({str(d): [latest[d][0].isoformat(), latest[d][1]] for d in linked})


def evaluate(latest: LatestValues) -> None:
    """After a reassembly (already in a Celery task): evaluate in place. One Celery round trip per
    transaction is what limited reassembly throughput, and the values are already in hand."""
    with transaction.atomic():
        changes, scored = telemetry_evaluate(latest=latest)
        send_followups(changes, scored)


def mark_heard(heard: datetime, device_ids: list[int], resolution: float) -> None:
    """Inside ingest's transaction: the assets these devices feed were heard from."""
    assets_mark_heard(heard=heard, device_ids=device_ids, resolution=resolution)
