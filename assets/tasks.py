"""Celery tasks (thin: they load arguments and call a service), and what follows a change once
it is committed: webhook deliveries sent, health rescored (debounced per asset)."""

from __future__ import annotations

import logging
from datetime import datetime

from celery import shared_task
from django.conf import settings
from django.core.cache import cache
from django.db import transaction

from argus import live
from argus.registry import current_schema, each_tenant_schema
from assets.alerts import AlertChanges, alerts_sweep
from assets.models import Alert
from assets.scoring import assets_score
from assets.services import health_recompute, telemetry_evaluate
from assets.webhooks import alert_payload, deliveries_due, delivery_attempt

log = logging.getLogger(__name__)


def send_followups(changes: AlertChanges, scored: set[int]) -> None:
    """Once the change is committed: its webhook deliveries queued, the health of the assets it
    touched scheduled. A delivery whose task is lost is sent by the sweep; a score, by the
    periodic recompute."""

    def send() -> None:
        for delivery_id in changes.deliveries:
            try:
                webhook_deliver.delay(delivery_id)
            except Exception:
                log.exception("could not queue webhook delivery id=%s (the sweep will send it)", delivery_id)
        health_schedule(sorted(scored | changes.assets))
        if changes.alerts:
            live_alerts(sorted(changes.alerts))

    transaction.on_commit(send)


def live_alerts(alert_ids: list[int]) -> None:
    """Tell open pages of the tenant what became of these alerts (argus/live.py)."""
    try:
        alerts = Alert.objects.filter(pk__in=alert_ids).select_related(
            "asset", "rule", "acknowledged_by", "resolved_by"
        )
        live.note(current_schema(), "alerts", {str(a.pk): alert_payload(a, "changed")["alert"] for a in alerts})
    except Exception:
        log.exception("could not note alerts %s for live pages", alert_ids)


def _debounce_key(asset_id: int) -> str:
    return f"health-due:{asset_id}"


def health_schedule(asset_ids: list[int]) -> None:
    """Rescore these assets in ARGUS_HEALTH_DEBOUNCE_SECONDS, at most one pending rescore per
    asset: an asset whose devices report every batch is scored about once a debounce period."""
    if not asset_ids:
        return
    delay = settings.ARGUS_HEALTH_DEBOUNCE_SECONDS
    # add() is False when a rescore is pending already; None when Redis is unavailable (the cache
    # ignores its errors), when the task cannot be queued either and the recompute catches up.
    due = [a for a in asset_ids if cache.add(_debounce_key(a), 1, timeout=max(30, int(delay * 30))) is not False]
    if not due:
        return
    try:
        health_score_assets.apply_async(args=[due], countdown=delay)
    except Exception:
        cache.delete_many([_debounce_key(a) for a in due])
        log.exception("could not queue health scoring assets=%s (the periodic recompute will)", due)


@shared_task(acks_late=True)
def health_score_assets(asset_ids: list[int]) -> int:
    """Score these assets from what is stored now (after the debounce)."""
    # Cleared first: values committed from here on schedule another rescore, which sees them.
    cache.delete_many([_debounce_key(a) for a in asset_ids])
    return assets_score(asset_ids=asset_ids)


@shared_task(acks_late=True)
def evaluate_latest_values(latest: dict[str, list[object]]) -> dict[str, int]:
    """Alerts (now) and health (debounced) for the newest values of a committed batch (runs in its tenant)."""
    parsed = {
        int(device_id): (datetime.fromisoformat(str(time)), dict(values))  # type: ignore[call-overload]
        for device_id, (time, values) in latest.items()
    }
    with transaction.atomic():
        changes, scored = telemetry_evaluate(latest=parsed)
        send_followups(changes, scored)
    return {"opened": changes.opened, "resolved": changes.resolved, "assets": len(scored)}


@shared_task
def health_recompute_tenant() -> int:
    """The safety net for the current tenant: rules again from stored values, every asset rescored."""
    with transaction.atomic():
        changes, assets = health_recompute()
        send_followups(changes, set())
    return assets_score(asset_ids=sorted(assets))


@shared_task
def health_recompute_all() -> int:
    """Queue the safety net in every tenant (from beat, which runs in the public schema)."""
    count = 0
    for _schema in each_tenant_schema():
        health_recompute_tenant.delay()
        count += 1
    return count


@shared_task
def alerts_sweep_tenant() -> dict[str, int]:
    """Duration and no-data rules decided by time, and webhook deliveries due for a retry."""
    with transaction.atomic():
        changes = alerts_sweep()
        send_followups(changes, set())
    retried = deliveries_due()
    return {"opened": changes.opened, "deliveries_attempted": retried}


@shared_task
def alerts_sweep_all() -> int:
    """Queue the sweep in every tenant (from beat)."""
    count = 0
    for _schema in each_tenant_schema():
        alerts_sweep_tenant.delay()
        count += 1
    return count


@shared_task(acks_late=True)
def webhook_deliver(delivery_id: int) -> str | None:
    """One attempt at one delivery (retries are scheduled on the row and sent by the sweep)."""
    return delivery_attempt(delivery_id=delivery_id)
