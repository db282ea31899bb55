"""An asset's values: its devices' readings renamed by each link's metric mapping and passed
through the asset type's transformation engine, so that rules and scores see asset metrics in
asset units. Shared by alerts (assets/alerts.py) and health (assets/scoring.py)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from django.db import connection

from argus.sql import bigint_array
from assets.models import AssetDevice, AssetType, TransformationEngine
from telemetry.messages import LatestValues
from telemetry.selectors import LatestReadings, latest_readings


@dataclass(frozen=True)
class AssetReading:
    """The newest value of one asset metric: device time, transformed value, the device it came from."""

    time: datetime
    value: float
    device_id: int


# asset id -> asset metric -> reading
AssetReadings = dict[int, dict[str, AssetReading]]


def transform(asset_type: AssetType, metric: str, value: float) -> float:
    """One value through the asset type's transformation engine."""
    if asset_type.transformation_engine != TransformationEngine.LINEAR:
        return value
    params = asset_type.transformation_config.get(metric)
    if params is None:
        return value
    return float(value * params.get("scale", 1.0) + params.get("offset", 0.0))


def readings_of_batch(latest: LatestValues) -> LatestReadings:
    """A committed batch's newest values per device, as per-metric readings (every metric of a
    device carries the time of its newest reading in the batch)."""
    return {device_id: {m: (time, v) for m, v in values.items()} for device_id, (time, values) in latest.items()}


def asset_readings(links: Iterable[AssetDevice], readings: LatestReadings) -> AssetReadings:
    """Per asset, the newest reading of each asset metric across all its devices (links need
    asset__asset_type selected). Two devices reporting one asset metric: the newer reading wins."""
    out: AssetReadings = {}
    for link in links:
        device_readings = readings.get(link.device_id)
        if not device_readings:
            continue
        asset_type = link.asset.asset_type
        metrics = out.setdefault(link.asset_id, {})
        for device_metric, (time, value) in device_readings.items():
            metric = link.metric_mapping.get(device_metric, device_metric)
            known = metrics.get(metric)
            if known is None or known.time < time:
                metrics[metric] = AssetReading(time, transform(asset_type, metric, value), link.device_id)
    return out


def device_metrics_of(links: Iterable[AssetDevice]) -> dict[int, set[str]]:
    """For each linked device, the device metrics its assets use: the asset type's metrics under
    the names the device reports them (the link's mapping read backwards), plus the metrics its
    device type declares (links need device__device_type and asset__asset_type selected)."""
    wanted: dict[int, set[str]] = {}
    for link in links:
        reverse = {asset_metric: device_metric for device_metric, asset_metric in link.metric_mapping.items()}
        names = wanted.setdefault(link.device_id, set())
        names.update(reverse.get(m, m) for m in link.asset.asset_type.metric_keys())
        declared = link.device.device_type.metrics
        if isinstance(declared, list):
            names.update(m for m in declared if isinstance(m, str))
    return wanted


def stored_readings(links: list[AssetDevice]) -> LatestReadings:
    """The newest stored reading of every metric these links' assets use."""
    return latest_readings(device_metrics_of(links))


def linked_devices(device_ids: list[int]) -> list[int]:
    """Those of these devices that feed an asset.

    Most readings (a gateway's 2000 beacons) come from devices no asset uses; one query with an
    array literal finds the few that matter before the ORM loads their links.
    """
    if not device_ids:
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT device_id FROM asset_devices WHERE device_id = ANY(%s::bigint[])",
            [bigint_array(device_ids)],
        )
        return [row[0] for row in cursor.fetchall()]


def assets_mark_heard(*, heard: datetime, device_ids: list[int], resolution: float) -> None:
    """Move last_telemetry_at of the assets these devices feed to `heard` (within half a
    resolution, as devices.last_seen: see telemetry/storage.py)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE assets SET last_telemetry_at = %s "
            "WHERE id IN (SELECT asset_id FROM asset_devices WHERE device_id = ANY(%s::bigint[])) "
            "AND (last_telemetry_at IS NULL OR last_telemetry_at < %s - make_interval(secs => %s))",
            [heard, bigint_array(device_ids), heard, resolution / 2],
        )


def links_of(*, device_ids: list[int] | None = None, asset_ids: list[int] | None = None) -> list[AssetDevice]:
    """Asset-device links with what values need (asset, its type, device, its type)."""
    links = AssetDevice.objects.select_related("asset__asset_type", "device__device_type")
    if device_ids is not None:
        links = links.filter(device_id__in=device_ids)
    if asset_ids is not None:
        links = links.filter(asset_id__in=asset_ids)
    return list(links)
