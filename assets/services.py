"""Threshold alerts and health scores from the newest telemetry of assets' devices."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from argus.sql import bigint_array
from assets.health import ALGORITHMS
from assets.models import (
    Alert,
    AlertStatus,
    Asset,
    AssetDevice,
    AssetType,
    ThresholdRule,
    TransformationEngine,
    asset_type_metric_definitions,
)
from telemetry.selectors import latest_values_of_devices, metric_values_since

log = logging.getLogger(__name__)

# device id -> (time, {metric: value})
LatestValues = Mapping[int, tuple[datetime, Mapping[str, float]]]


@dataclass
class EvaluationOutcome:
    """What one evaluation changed."""

    alerts_raised: int = 0
    alerts_resolved: int = 0
    scores_updated: int = 0


def transform_values(asset_type: AssetType, values: Mapping[str, float]) -> dict[str, float]:
    """Apply the asset type's transformation engine to raw metric values."""
    if asset_type.transformation_engine != TransformationEngine.LINEAR:
        return dict(values)
    out = dict(values)
    for metric, params in asset_type.transformation_config.items():
        if metric in out:
            out[metric] = out[metric] * params.get("scale", 1.0) + params.get("offset", 0.0)
    return out


def asset_values(links: list[AssetDevice], latest: LatestValues) -> dict[int, tuple[datetime, dict[str, float]]]:
    """Per asset: the newest values of its devices, renamed by each link's metric mapping."""
    merged: dict[int, tuple[datetime, dict[str, float]]] = {}
    for link in links:
        if link.device_id not in latest:
            continue
        time, values = latest[link.device_id]
        renamed = {link.metric_mapping.get(k, k): v for k, v in values.items()}
        values_now = transform_values(link.asset.asset_type, renamed)
        previous = merged.get(link.asset_id)
        if previous is None:
            merged[link.asset_id] = (time, values_now)
        else:
            merged[link.asset_id] = (max(previous[0], time), {**previous[1], **values_now})
    return merged


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


def _held_for(rule: ThresholdRule, device_ids: list[int], since: datetime) -> bool:
    """Whether every reading of the rule's metric since `since` breaches it (duration rules)."""
    values = metric_values_since(device_ids=device_ids, metric=rule.metric, since=since)
    return bool(values) and all(rule.breached(v) for v in values)


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


def telemetry_evaluate(*, latest: LatestValues) -> EvaluationOutcome:
    """Raise and resolve threshold alerts and rescore the assets fed by these devices."""
    outcome = EvaluationOutcome()
    linked = linked_devices(list(latest))
    if not linked:
        return outcome
    links = list(AssetDevice.objects.filter(device_id__in=linked).select_related("asset", "asset__asset_type"))
    if not links:
        return outcome
    per_asset = asset_values(links, latest)
    assets = {link.asset_id: link.asset for link in links}
    devices_of: dict[int, list[int]] = defaultdict(list)
    for link in links:
        devices_of[link.asset_id].append(link.device_id)
    type_ids = {a.asset_type_id for a in assets.values()}
    rules = list(
        ThresholdRule.objects.filter(enabled=True).filter(Q(asset_id__in=list(assets)) | Q(asset_type_id__in=type_ids))
    )
    open_alerts = {
        (a.rule_id, a.asset_id): a
        for a in Alert.objects.filter(asset_id__in=list(assets)).exclude(status=AlertStatus.RESOLVED)
    }
    now = timezone.now()
    with transaction.atomic():
        for asset_id, (time, values) in per_asset.items():
            asset = assets[asset_id]
            for rule in rules:
                if rule.asset_id not in (None, asset_id) or (
                    rule.asset_id is None and rule.asset_type_id != asset.asset_type_id
                ):
                    continue
                if rule.metric not in values:
                    continue
                value = values[rule.metric]
                alert = open_alerts.get((rule.pk, asset_id))
                if alert is None and rule.breached(value):
                    if rule.duration_seconds and not _held_for(
                        rule, devices_of[asset_id], time - timedelta(seconds=rule.duration_seconds)
                    ):
                        continue
                    _, created = Alert.objects.get_or_create(
                        rule=rule,
                        asset=asset,
                        status=AlertStatus.ACTIVE,
                        defaults={
                            "metric": rule.metric,
                            "value": value,
                            "severity": rule.severity,
                            "raised_at": time,
                            "device_id": devices_of[asset_id][0],
                            "message": f"{asset.name}: {rule.metric} = {value:g} ({rule.get_operator_display()} "
                            f"{rule.threshold:g})",
                        },
                    )
                    if created:
                        outcome.alerts_raised += 1
                        log.info("alert raised asset=%s rule=%s value=%s", asset.name, rule.name, value)
                elif alert is not None and rule.cleared(value):
                    alert.status = AlertStatus.RESOLVED
                    alert.resolved_at = now
                    alert.save(update_fields=["status", "resolved_at"])
                    outcome.alerts_resolved += 1
            if _score(asset, values, now):
                outcome.scores_updated += 1
    return outcome


def _score(asset: Asset, values: Mapping[str, float], now: datetime) -> bool:
    """Recompute one asset's health score from its newest values; True if it changed."""
    asset_type = asset.asset_type
    algorithm = ALGORITHMS.get(asset_type.health_algorithm)
    if algorithm is None or algorithm.name == "none":
        return False
    definitions = asset_type_metric_definitions(asset_type)
    score = algorithm.score(asset_type.health_parameters, definitions, values)
    if score is None:
        return False
    Asset.objects.filter(pk=asset.pk).update(
        health_score=Decimal(str(score)).quantize(Decimal("0.01")),
        health_score_updated_at=now,
        health_score_computed_by=f"{algorithm.name}",
    )
    return True


def health_recompute(*, asset_ids: list[int] | None = None) -> int:
    """The periodic safety net: threshold rules and health scores evaluated again from the stored
    newest values of the assets' devices, as a follow-up task lost after its batch committed (a
    Redis restart, a failed enqueue) would have done. Returns how many scores changed."""
    links = AssetDevice.objects.all()
    if asset_ids is not None:
        links = links.filter(asset_id__in=asset_ids)
    device_ids = sorted(set(links.values_list("device_id", flat=True)))
    return telemetry_evaluate(latest=latest_values_of_devices(device_ids)).scores_updated
