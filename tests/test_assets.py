"""The units of the operator's half: both health algorithms and the threshold rule against values
computed by hand, and the admin's list pages, whose query count must not grow with their rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_tenants.utils import schema_context

from assets.health import ALGORITHMS, HealthInputs, HealthResult, OpenAlert
from assets.models import Alert, Asset, AssetType, RuleOperator, Severity, ThresholdRule
from tests.conftest import TenantPersona, make_device, make_device_type, tenant_admin_client, unique_id

DEFINITIONS = {
    "temperature": {"key": "temperature", "min": 10, "max": 30},
    "vibration": {"key": "vibration", "min": 0, "max": 5},
}


def weighted(values: dict[str, float], **params: Any) -> HealthResult | None:
    return ALGORITHMS["weighted"].evaluate(
        {"weights": {"temperature": 2, "vibration": 1}, **params}, DEFINITIONS, HealthInputs(values=values)
    )


def score_of(result: HealthResult | None) -> float | None:
    return None if result is None else result.score


def test_it_scores_the_weighted_mean_of_metrics_within_their_ranges() -> None:
    assert score_of(weighted({"temperature": 20, "vibration": 2})) == 100.0
    # Critical by default one range-width beyond normal: 5 above a range 20 wide is 100 * (1 - 5/20)
    # = 75; (2 * 75 + 1 * 100) / 3 = 83.33
    assert score_of(weighted({"temperature": 35, "vibration": 2})) == 83.33
    # Half the tolerance: 5 above a width of 10 scores 50; (2 * 50 + 100) / 3 = 66.67
    assert score_of(weighted({"temperature": 35, "vibration": 2}, tolerance=0.5)) == 66.67
    # 30 below a range 20 wide is past critical: (2 * 0 + 100) / 3 = 33.33
    assert score_of(weighted({"temperature": -20, "vibration": 2})) == 33.33
    # Only the metrics reported count: vibration 6 is 1 above a range 5 wide, 100 * (1 - 1/5) = 80
    assert score_of(weighted({"vibration": 6})) == 80.0
    assert weighted({"humidity": 50}) is None


def test_it_scores_from_the_normal_to_the_critical_range_and_explains_it() -> None:
    ranges = {"temperature": {"normal": [18, 26], "critical": [10, 30]}}
    # temperature 28: 2 of the 4 between normal (26) and critical (30) high: 50; vibration 1: 100.
    result = weighted({"temperature": 28, "vibration": 1}, ranges=ranges)
    assert result is not None
    assert result.score == 66.67  # (2 * 50 + 1 * 100) / 3
    assert result.explanation == {
        "metrics": [
            {
                "metric": "temperature",
                "value": 28,
                "score": 50.0,
                "weight": 2,
                "normal": [18, 26],
                "critical": [10, 30],
            },
            {"metric": "vibration", "value": 1, "score": 100.0, "weight": 1, "normal": [0, 5], "critical": [-5, 10]},
        ],
        "missing": [],
    }
    # 12: 6 of the 8 between critical low (10) and normal low (18): 25; at or past critical: 0.
    assert score_of(weighted({"temperature": 12}, ranges=ranges)) == 25.0
    assert score_of(weighted({"temperature": 10}, ranges=ranges)) == 0.0
    assert score_of(weighted({"temperature": 31}, ranges=ranges)) == 0.0
    assert weighted({"temperature": 20}, ranges=ranges).explanation["missing"] == ["vibration"]  # type: ignore[union-attr]


def penalties(alerts: list[OpenAlert], **params: Any) -> HealthResult | None:
    return ALGORITHMS["threshold"].evaluate(params, DEFINITIONS, HealthInputs(values={}, open_alerts=alerts))


def test_it_takes_a_penalty_per_open_alert_by_severity() -> None:
    hot = OpenAlert(id=1, rule="hot", metric="temperature", severity="warning")
    shaking = OpenAlert(id=2, rule="shaking", metric="vibration", severity="critical")
    note = OpenAlert(id=3, rule="note", metric="vibration", severity="info")
    assert score_of(penalties([])) == 100.0
    assert score_of(penalties([hot])) == 80.0  # 100 - 20
    result = penalties([shaking, hot, note])
    assert result is not None and result.score == 25.0  # 100 - 50 - 20 - 5
    assert [(c["alert"], c["penalty"]) for c in result.explanation["alerts"]] == [(1, 20.0), (2, 50.0), (3, 5.0)]
    assert score_of(penalties([shaking, shaking, hot])) == 0.0  # never below 0
    assert score_of(penalties([hot], penalties={"warning": 35})) == 65.0


def rule(operator: str, threshold: float, high: float | None = None, hysteresis: float = 0.0) -> ThresholdRule:
    return ThresholdRule(operator=operator, threshold=threshold, threshold_high=high, hysteresis=hysteresis)


@pytest.mark.parametrize(
    ("operator", "high", "breached", "not_breached"),
    [
        (RuleOperator.GT, None, [30.1, 99], [30, 0]),
        (RuleOperator.GTE, None, [30, 31], [29.9]),
        (RuleOperator.LT, None, [29.9, -5], [30, 31]),
        (RuleOperator.LTE, None, [30, 0], [30.1]),
        (RuleOperator.OUTSIDE, 40.0, [29.9, 40.1], [30, 35, 40]),
        (RuleOperator.INSIDE, 40.0, [30, 35, 40], [29.9, 40.1]),
    ],
)
def test_it_tells_when_a_rule_is_breached(
    operator: str, high: float | None, breached: list[float], not_breached: list[float]
) -> None:
    assert [rule(operator, 30, high).breached(v) for v in breached] == [True] * len(breached)
    assert [rule(operator, 30, high).breached(v) for v in not_breached] == [False] * len(not_breached)


@pytest.mark.parametrize(
    ("operator", "high", "cleared", "still_open"),
    [
        # Hysteresis 2 around a threshold of 30 (and a high of 40 for the ranges).
        (RuleOperator.GT, None, [28, 0], [28.1, 30, 31]),
        (RuleOperator.GTE, None, [27.9], [28, 30]),
        (RuleOperator.LT, None, [32, 50], [31.9, 30]),
        (RuleOperator.LTE, None, [32.1], [32, 30]),
        (RuleOperator.OUTSIDE, 40.0, [32, 35, 38], [31.9, 38.1, 29]),
        (RuleOperator.INSIDE, 40.0, [27.9, 42.1], [28, 35, 42]),
    ],
)
def test_it_clears_a_rule_only_past_its_hysteresis(
    operator: str, high: float | None, cleared: list[float], still_open: list[float]
) -> None:
    assert [rule(operator, 30, high, 2).cleared(v) for v in cleared] == [True] * len(cleared)
    assert [rule(operator, 30, high, 2).cleared(v) for v in still_open] == [False] * len(still_open)


# --- The admin's list pages: a constant number of queries, however many rows -----------------------


def queries_for(client: Any, url: str) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200, response.content[:500]
    return len(captured)


def add_devices(count: int) -> None:
    device_type = make_device_type()
    for _ in range(count):
        make_device(device_type)


def add_assets_and_alerts(count: int) -> None:
    asset_type = AssetType.objects.create(name=unique_id("asset-type"))
    device = make_device(make_device_type())
    for _ in range(count):
        asset = Asset.objects.create(asset_type=asset_type, name=unique_id("asset"))
        threshold_rule = ThresholdRule.objects.create(
            name=unique_id("rule"), asset=asset, metric="temperature", operator="gt", threshold=30
        )
        Alert.objects.create(
            rule=threshold_rule,
            asset=asset,
            device=device,
            metric="temperature",
            value=31,
            severity=Severity.WARNING,
            raised_at=timezone.now(),
        )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "add"),
    [
        ("/admin/devices/device/", add_devices),
        ("/admin/devices/devicetype/", lambda n: [make_device_type() for _ in range(n)]),
        ("/admin/assets/asset/", add_assets_and_alerts),
        ("/admin/assets/thresholdrule/", add_assets_and_alerts),
        ("/admin/assets/alert/", add_assets_and_alerts),
    ],
)
def test_it_lists_admin_pages_in_a_constant_number_of_queries(
    alpha: TenantPersona, url: str, add: Callable[[int], object]
) -> None:
    client = tenant_admin_client(alpha)
    with schema_context(alpha.schema):
        add(2)
    few = queries_for(client, url)
    with schema_context(alpha.schema):
        add(8)
    assert queries_for(client, url) == few


def test_it_raises_an_alert_from_stored_values_when_the_follow_up_task_was_lost(in_alpha: TenantPersona) -> None:
    # A batch stored, then its evaluation task lost (Redis restarted before a worker took it):
    # the periodic recompute raises the alert from what is stored.
    from assets.models import AssetDevice
    from assets.services import health_recompute
    from telemetry.ingest import ingest_batch
    from telemetry.messages import IncomingMessage
    from telemetry.profiles import ProfileCache

    device = make_device(make_device_type())
    asset_type = AssetType.objects.create(
        name=unique_id("asset-type"), metric_definitions=[{"key": "temperature", "min": 0, "max": 30}]
    )
    asset = Asset.objects.create(asset_type=asset_type, name=unique_id("asset"))
    AssetDevice.objects.create(asset=asset, device=device)
    ThresholdRule.objects.create(name=unique_id("rule"), asset=asset, metric="temperature", operator="gt", threshold=30)
    payload = b'{"msg_id": "hot", "values": {"temperature": 35}}'
    message = IncomingMessage(
        key="k", logical_id=device.logical_identifier, received_at=timezone.now(), payload=payload
    )
    assert ingest_batch(messages=[message], profiles=ProfileCache()).readings == 1
    assert not Alert.objects.filter(asset=asset).exists()
    health_recompute()
    alert = Alert.objects.get(asset=asset)
    assert (alert.metric, alert.value, alert.status) == ("temperature", 35.0, "open")


def test_it_scores_the_worked_example_of_the_docs() -> None:
    # docs/alerts-and-health.md, "weighted": the seed's HVAC System at 28 °C and 20 kW.
    definitions = {"temperature": {"min": 18, "max": 26}, "power": {"min": 0, "max": 15}}
    params = {"weights": {"temperature": 0.6, "power": 0.4}, "tolerance": 1.0}
    result = ALGORITHMS["weighted"].evaluate(params, definitions, HealthInputs({"temperature": 28, "power": 20}))
    assert result is not None and result.score == 71.67
    assert [(m["metric"], m["score"], m["critical"]) for m in result.explanation["metrics"]] == [
        ("power", 66.67, [-15, 30]),
        ("temperature", 75.0, [10, 34]),
    ]
