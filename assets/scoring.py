"""Health scores: each asset scored from the latest stored value of every metric it has (across
all its devices) and its open alerts, with the explanation and the algorithm's version kept on
the asset and, for every change, in its history (`asset_health_scores`)."""

from __future__ import annotations

import functools
import logging
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from argus import live
from argus.registry import current_schema
from assets.health import ALGORITHMS, HealthInputs, OpenAlert
from assets.models import Alert, AlertStatus, Asset, AssetHealthScore, asset_type_metric_definitions
from assets.values import asset_readings, links_of, stored_readings

log = logging.getLogger(__name__)


def assets_score(*, asset_ids: list[int]) -> int:
    """Recompute these assets' scores from what is stored now; returns how many changed."""
    assets = {a.pk: a for a in Asset.objects.filter(pk__in=asset_ids).select_related("asset_type")}
    scored = {pk: a for pk, a in assets.items() if a.asset_type.health_algorithm in ALGORITHMS}
    scored = {pk: a for pk, a in scored.items() if a.asset_type.health_algorithm != "none"}
    if not scored:
        return 0
    links = links_of(asset_ids=list(scored))
    readings = asset_readings(links, stored_readings(links))
    open_alerts: dict[int, list[OpenAlert]] = {}
    for alert in (
        Alert.objects.filter(asset_id__in=list(scored)).exclude(status=AlertStatus.RESOLVED).select_related("rule")
    ):
        open_alerts.setdefault(alert.asset_id, []).append(
            OpenAlert(id=alert.pk, rule=alert.rule.name, metric=alert.metric, severity=alert.severity)
        )
    now = timezone.now()
    changed = 0
    for asset in scored.values():
        asset_type = asset.asset_type
        algorithm = ALGORITHMS[asset_type.health_algorithm]
        values = {metric: r.value for metric, r in readings.get(asset.pk, {}).items()}
        result = algorithm.evaluate(
            asset_type.health_parameters,
            asset_type_metric_definitions(asset_type),
            HealthInputs(values=values, open_alerts=open_alerts.get(asset.pk, ())),
        )
        if result is None:
            continue
        score = Decimal(str(result.score)).quantize(Decimal("0.01"))
        computed_by = f"{algorithm.name}@{algorithm.version}"
        # Open pages get every scoring, changed or not: it carries the asset's latest values too.
        item = {"score": float(score), "computed_by": computed_by, "explanation": result.explanation, "latest": values}
        transaction.on_commit(functools.partial(live.note, current_schema(), "health", {str(asset.pk): item}))
        if (asset.health_score, asset.health_explanation, asset.health_score_computed_by) == (
            score,
            result.explanation,
            computed_by,
        ):
            continue
        with transaction.atomic():
            Asset.objects.filter(pk=asset.pk).update(
                health_score=score,
                health_score_updated_at=now,
                health_score_computed_by=computed_by,
                health_explanation=result.explanation,
            )
            if score != asset.health_score or computed_by != asset.health_score_computed_by:
                AssetHealthScore.objects.create(
                    asset=asset,
                    time=now,
                    score=score,
                    algorithm=algorithm.name,
                    version=algorithm.version,
                    explanation=result.explanation,
                )
                changed += 1
                log.info("health score asset=%s %s -> %s (%s)", asset.name, asset.health_score, score, computed_by)
    return changed
