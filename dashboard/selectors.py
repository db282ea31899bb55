"""What the dashboard page shows when it opens; the events (argus/live.py) keep it current."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db.models import F, Q
from django.utils import timezone

from assets.models import Alert, AlertStatus, Asset, AssetHealthScore
from assets.selectors import asset_views
from devices.models import Device, presence_text
from telemetry.selectors import latest_readings, metrics_of_device

DEVICES_SHOWN = 100
ASSETS_SHOWN = 100
TREND = timedelta(hours=1)


@dataclass
class Overview:
    assets: list[dict[str, Any]]
    alerts: list[Alert]
    devices: list[dict[str, Any]]


def overview(*, now: datetime | None = None) -> Overview:
    """The tenant's assets (health, explanation, the last hour's scores), unresolved alerts, and
    its most recently heard devices with their newest readings; a fixed number of queries."""
    now = now or timezone.now()
    assets = list(Asset.objects.select_related("asset_type").order_by("name")[:ASSETS_SHOWN])
    views = asset_views([a.pk for a in assets])
    trend: dict[int, list[float]] = {}
    for asset_id, score in (
        AssetHealthScore.objects.filter(asset__in=assets, time__gte=now - TREND)
        .order_by("time")
        .values_list("asset_id", "score")
    ):
        trend.setdefault(asset_id, []).append(float(score))
    asset_rows = [
        {
            "asset": a,
            "score": float(a.health_score) if a.health_score is not None else None,
            "trend": trend.get(a.pk, []),
            "latest": {m: r.value for m, r in sorted(views[a.pk].latest.items())},
        }
        for a in assets
    ]
    alerts = list(
        Alert.objects.exclude(status=AlertStatus.RESOLVED).select_related("asset", "rule").order_by("-raised_at")[:100]
    )
    # Heard from, or at least said it is online or offline (a device may connect before it sends).
    devices = list(
        Device.objects.with_presence()
        .filter(Q(last_seen__isnull=False) | Q(online__isnull=False))
        .order_by(F("last_seen").desc(nulls_last=True), "pk")[:DEVICES_SHOWN]
        .only(
            "pk",
            "logical_identifier",
            "name",
            "last_seen",
            "created_at",
            "status",
            "online",
            "presence_since",
            "last_disconnect_reason",
            "device_type__metrics",
            "device_type__expected_interval_seconds",
        )
    )
    declared = {
        d.pk: d.device_type.metrics
        for d in Device.objects.filter(pk__in=[d.pk for d in devices]).select_related("device_type")
    }
    readings = latest_readings({pk: [m for m in metrics if isinstance(m, str)] for pk, metrics in declared.items()})
    device_rows = []
    for d in devices:
        newest = readings.get(d.pk, {})
        time = max((t for t, _ in newest.values()), default=None)
        device_rows.append(
            {
                "device": d,
                "presence": presence_text(d),
                "time": time,
                "values": {m: v for m, (_, v) in sorted(newest.items())},
            }
        )
    return Overview(assets=asset_rows, alerts=alerts, devices=device_rows)


def device_metrics(device: Device) -> list[str]:
    """The metrics a device has readings of, for the device page's chart."""
    return metrics_of_device(device.pk)
