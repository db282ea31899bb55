"""Celery tasks (thin: they load arguments and call a service)."""

from __future__ import annotations

from datetime import datetime

from celery import shared_task

from argus.registry import each_tenant_schema
from assets.services import health_recompute, telemetry_evaluate


@shared_task(acks_late=True)
def evaluate_latest_values(latest: dict[str, list[object]]) -> dict[str, int]:
    """Alerts and health for the newest values of a committed batch (runs in its tenant)."""
    parsed = {
        int(device_id): (datetime.fromisoformat(str(time)), dict(values))  # type: ignore[call-overload]
        for device_id, (time, values) in latest.items()
    }
    outcome = telemetry_evaluate(latest=parsed)
    return {"raised": outcome.alerts_raised, "resolved": outcome.alerts_resolved, "scored": outcome.scores_updated}


@shared_task
def health_recompute_tenant() -> int:
    """Rescore every asset of the current tenant."""
    return health_recompute()


@shared_task
def health_recompute_all() -> int:
    """Queue a rescore in every tenant (from beat, which runs in the public schema)."""
    count = 0
    for _schema in each_tenant_schema():
        health_recompute_tenant.delay()
        count += 1
    return count
