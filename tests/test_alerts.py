"""Threshold alerts to spec, health from every metric, webhooks: the services against the real
PostgreSQL, in-process (tests/test_alerts_pipeline.py runs them through the real processes).

Device times are given explicitly: a rule's duration is measured in the device's time, and a
reading older than the newest one evaluated must not move the rule's state."""

from __future__ import annotations

import http.server
import ipaddress
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connections
from django.test import override_settings
from django.utils import timezone
from django_tenants.utils import schema_context

from argus.outbound import url_errors
from assets.alerts import AlertChanges, alert_resolve, alerts_sweep
from assets.models import (
    Alert,
    AlertStatus,
    Asset,
    AssetDevice,
    AssetHealthScore,
    AssetType,
    DeliveryStatus,
    Resolution,
    RuleState,
    ThresholdRule,
    WebhookDelivery,
    WebhookEndpoint,
)
from assets.scoring import assets_score
from assets.services import telemetry_evaluate
from assets.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, deliveries_due, delivery_attempt, sign
from devices.models import Device
from telemetry.ingest import ingest_batch
from telemetry.messages import IncomingMessage
from telemetry.profiles import ProfileCache
from tests.conftest import TenantPersona, make_device, make_device_type, unique_id

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass
class Watched:
    device: Device
    asset: Asset
    rule: ThresholdRule

    def reading(self, seconds: float, **values: float) -> AlertChanges:
        changes, _ = telemetry_evaluate(latest={self.device.pk: (at(seconds), values)})
        return changes

    def alerts(self) -> list[Alert]:
        return list(Alert.objects.filter(asset=self.asset, rule=self.rule).order_by("pk"))

    def open_alert(self) -> Alert | None:
        return Alert.objects.filter(asset=self.asset, rule=self.rule).exclude(status=AlertStatus.RESOLVED).first()


def watched(
    *, metrics: tuple[str, ...] = ("temperature",), mapping: dict[str, str] | None = None, **rule: Any
) -> Watched:
    """A device feeding an asset whose type has one rule (gt 30 unless given)."""
    device = make_device(make_device_type(metrics=list(metrics)))
    asset_type = AssetType.objects.create(
        name=unique_id("asset-type"), metric_definitions=[{"key": "temperature", "min": 0, "max": 30}]
    )
    asset = Asset.objects.create(asset_type=asset_type, name=unique_id("asset"))
    AssetDevice.objects.create(asset=asset, device=device, metric_mapping=mapping or {})
    values: dict[str, Any] = {"metric": "temperature", "operator": "gt", "threshold": 30, **rule}
    threshold_rule = ThresholdRule.objects.create(name=unique_id("rule"), asset_type=asset_type, **values)
    return Watched(device, asset, threshold_rule)


def test_it_opens_only_once_the_condition_has_held_for_the_duration_in_device_time(in_alpha: TenantPersona) -> None:
    w = watched(duration_seconds=60)
    w.reading(0, temperature=35)
    w.reading(30, temperature=35)
    w.reading(50, temperature=25)  # the run breaks
    w.reading(70, temperature=35)
    w.reading(100, temperature=35)
    assert w.alerts() == []  # 30 s without a break: shorter than the duration
    changes = w.reading(131, temperature=36)
    assert changes.opened == 1
    (alert,) = w.alerts()
    assert (alert.status, alert.value, alert.condition_since) == (AlertStatus.OPEN, 36.0, at(70))


def test_it_needs_more_than_one_reading_when_readings_are_sparser_than_the_duration(in_alpha: TenantPersona) -> None:
    w = watched(duration_seconds=60)
    w.reading(0, temperature=35)
    assert w.alerts() == []  # a single breaching reading is not a condition that held for 60 s
    w.reading(300, temperature=35)  # still breaching 300 s later, nothing in between broke it
    assert len(w.alerts()) == 1


def test_it_does_not_flap_inside_the_hysteresis_band_and_resolves_past_it(in_alpha: TenantPersona) -> None:
    w = watched(hysteresis=2)
    assert w.reading(0, temperature=31).opened == 1
    for second, value in enumerate([29.5, 30.5, 28.5, 29.9, 30.1], start=1):
        changes = w.reading(second, temperature=value)
        assert (changes.opened, changes.resolved) == (0, 0), value
    assert w.reading(10, temperature=27.9).resolved == 1
    first = w.alerts()[0]
    assert (first.status, first.resolution, first.last_value) == (AlertStatus.RESOLVED, Resolution.AUTO, 27.9)
    w.reading(11, temperature=29)  # below the threshold: no alert
    assert w.reading(12, temperature=31).opened == 1
    assert [a.status for a in w.alerts()] == [AlertStatus.RESOLVED, AlertStatus.OPEN]


def test_it_ignores_back_filled_readings_for_the_state(in_alpha: TenantPersona) -> None:
    w = watched()
    w.reading(100, temperature=25)
    w.reading(50, temperature=35)  # older than what was evaluated: changes nothing
    assert w.alerts() == []
    w.reading(200, temperature=35)
    w.reading(150, temperature=20)  # an older cool reading does not resolve the alert
    assert w.open_alert() is not None
    state = RuleState.objects.get(rule=w.rule, asset=w.asset)
    assert (state.last_time, state.last_value) == (at(200), 35.0)


def test_it_evaluates_the_assets_transformed_values(in_alpha: TenantPersona) -> None:
    # The device reports tenths of a degree as temp_raw; the asset's metric is temperature in °C.
    w = watched(metrics=("temp_raw",), mapping={"temp_raw": "temperature"})
    AssetType.objects.filter(pk=w.asset.asset_type_id).update(
        transformation_engine="linear", transformation_config={"temperature": {"scale": 0.1}}
    )
    w.reading(0, temp_raw=290)
    assert w.alerts() == []  # 29.0 °C
    w.reading(1, temp_raw=305)
    alert = w.open_alert()
    assert alert is not None and alert.value == 30.5
    w.reading(2, temp_raw=200)
    assert w.open_alert() is None


def test_it_opens_from_the_sweep_once_the_duration_has_passed_without_a_reading(in_alpha: TenantPersona) -> None:
    w = watched(duration_seconds=1)
    w.reading(0, temperature=35)
    assert alerts_sweep().opened == 0
    RuleState.objects.filter(rule=w.rule).update(heard_at=timezone.now() - timedelta(seconds=1.5))
    assert alerts_sweep().opened == 1
    alert = w.open_alert()
    assert alert is not None and (alert.value, alert.condition_since) == (35.0, at(0))
    assert alerts_sweep().opened == 0  # one open alert per rule and asset


def test_it_judges_a_device_by_its_own_clock_in_the_sweep(in_alpha: TenantPersona) -> None:
    w = watched(duration_seconds=60)
    # The device's clock is an hour behind: its reading is an hour old by the wall clock, but it
    # has breached for a moment only in its own time.
    w.reading((timezone.now() - T0).total_seconds() - 3600, temperature=35)
    assert alerts_sweep().opened == 0


def test_it_opens_a_no_data_alert_and_resolves_it_when_data_arrives(in_alpha: TenantPersona) -> None:
    w = watched(operator="no_data", threshold=None, no_data_seconds=30)
    assert alerts_sweep().opened == 0  # the silence is counted from when the rule first sees the asset
    RuleState.objects.filter(rule=w.rule).update(heard_at=timezone.now() - timedelta(seconds=31))
    assert alerts_sweep().opened == 1
    alert = w.open_alert()
    assert alert is not None and alert.value is None and "no temperature for 30 s" in alert.message
    assert w.reading(0, temperature=5).resolved == 1
    assert w.open_alert() is None


def test_it_starts_afresh_after_a_resolve_by_hand(in_alpha: TenantPersona, django_user_model: Any) -> None:
    w = watched(duration_seconds=10)
    w.reading(0, temperature=35)
    w.reading(10, temperature=35)
    alert = w.open_alert()
    assert alert is not None
    operator = django_user_model.objects.create(username=unique_id("operator"))
    resolved, changes = alert_resolve(alert_id=alert.pk, user=operator)
    assert (resolved.resolution, resolved.resolved_by, changes.resolved) == (Resolution.MANUAL, operator, 1)
    w.reading(15, temperature=35)  # still hot, but the duration counts again from here
    assert w.open_alert() is None
    w.reading(25, temperature=35)
    assert w.open_alert() is not None


def test_it_keeps_one_open_alert_when_workers_evaluate_the_same_asset_at_once(
    live_db: None, alpha: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        w = watched()
    workers = 4
    barrier = threading.Barrier(workers)
    errors: list[Exception] = []

    def work(n: int) -> None:
        try:
            with schema_context(alpha.schema):
                barrier.wait()
                for step in range(10):
                    telemetry_evaluate(latest={w.device.pk: (at(step * workers + n), {"temperature": 35.0})})
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with schema_context(alpha.schema):
        assert [a.status for a in w.alerts()] == [AlertStatus.OPEN]


# --- Health: from the latest stored value of every metric ----------------------------------


def store(device: Device, seconds: float, **values: float) -> None:
    """One message through ingest (history rows, as the pipeline writes them)."""
    payload = json.dumps({"ts": int(at(seconds).timestamp() * 1000), "values": values}).encode()
    message = IncomingMessage(
        key=unique_id("k"), logical_id=device.logical_identifier, received_at=timezone.now(), payload=payload
    )
    assert ingest_batch(messages=[message], profiles=ProfileCache()).readings == len(values)


def test_it_scores_from_the_latest_value_of_every_metric_across_the_assets_devices(in_alpha: TenantPersona) -> None:
    schema = {"type": "object"}
    thermometer = make_device(make_device_type(metrics=["temperature"], message_schema=schema))
    meter = make_device(make_device_type(metrics=["power"], message_schema=schema))
    asset_type = AssetType.objects.create(
        name=unique_id("hvac"),
        metric_definitions=[{"key": "temperature", "min": 18, "max": 26}, {"key": "power", "min": 0, "max": 15}],
        health_algorithm="weighted",
        health_parameters={"weights": {"temperature": 0.6, "power": 0.4}},
    )
    asset = Asset.objects.create(asset_type=asset_type, name=unique_id("hvac"))
    AssetDevice.objects.create(asset=asset, device=thermometer)
    AssetDevice.objects.create(asset=asset, device=meter)

    store(thermometer, 0, temperature=22)
    assert assets_score(asset_ids=[asset.pk]) == 1
    asset.refresh_from_db()
    assert asset.health_score == Decimal("100.00")
    assert asset.health_explanation["missing"] == ["power"]
    # The meter's batch carries only power; the thermometer's stored 22 °C still counts.
    store(meter, 1, power=20)  # 5 above a range 15 wide: 100 * (1 - 5/15) = 66.67
    store(thermometer, -60, temperature=40)  # back-filled: older than the stored 22 °C
    assert assets_score(asset_ids=[asset.pk]) == 1
    asset.refresh_from_db()
    assert asset.health_score == Decimal("86.67")  # 0.6 * 100 + 0.4 * 66.67
    assert asset.health_score_computed_by == "weighted@2"
    assert [(m["metric"], m["value"], m["score"]) for m in asset.health_explanation["metrics"]] == [
        ("power", 20.0, 66.67),
        ("temperature", 22.0, 100.0),
    ]
    assert assets_score(asset_ids=[asset.pk]) == 0  # nothing new: no change, no history row
    assert list(AssetHealthScore.objects.filter(asset=asset).order_by("time").values_list("score", flat=True)) == [
        Decimal("100.00"),
        Decimal("86.67"),
    ]


def test_it_takes_points_off_for_open_alerts_and_says_which(in_alpha: TenantPersona) -> None:
    w = watched(severity="critical")
    AssetType.objects.filter(pk=w.asset.asset_type_id).update(health_algorithm="threshold", health_parameters={})
    assets_score(asset_ids=[w.asset.pk])
    w.asset.refresh_from_db()
    assert (w.asset.health_score, w.asset.health_explanation["alerts"]) == (Decimal("100.00"), [])
    w.reading(0, temperature=35)
    assets_score(asset_ids=[w.asset.pk])
    w.asset.refresh_from_db()
    assert w.asset.health_score == Decimal("50.00")
    (cost,) = w.asset.health_explanation["alerts"]
    assert (cost["rule"], cost["severity"], cost["penalty"]) == (w.rule.name, "critical", 50.0)


# --- Webhooks ------------------------------------------------------------------------------


class Receiver:
    """A webhook receiver on loopback that answers the given statuses in turn (then 200)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers.items()), body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/argus?source=test"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([500])
    try:
        yield r
    finally:
        r.close()


LOOPBACK_ALLOWED = override_settings(ARGUS_WEBHOOK_ALLOWED_NETWORKS=[ipaddress.ip_network("127.0.0.0/8")])


def test_it_signs_each_event_and_retries_until_delivered(in_alpha: TenantPersona, receiver: Receiver) -> None:
    with LOOPBACK_ALLOWED:
        endpoint = WebhookEndpoint.objects.create(name=unique_id("ops"), url=receiver.url)
        endpoint.full_clean()
        w = watched()
        changes = w.reading(0, temperature=35)
        (delivery_id,) = changes.deliveries
        assert delivery_attempt(delivery_id=delivery_id) == DeliveryStatus.PENDING  # the receiver said 500
        delivery = WebhookDelivery.objects.get(pk=delivery_id)
        assert (delivery.attempts, delivery.response_status) == (1, 500)
        assert delivery.next_attempt_at is not None and delivery.next_attempt_at > timezone.now()
        assert deliveries_due() == 0  # not due yet: backoff
        WebhookDelivery.objects.filter(pk=delivery_id).update(next_attempt_at=timezone.now())
        assert deliveries_due() == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.response_status) == (DeliveryStatus.DELIVERED, 2, 200)
    headers, body = receiver.requests[-1]
    assert headers[SIGNATURE_HEADER] == sign(endpoint.secret, int(headers[TIMESTAMP_HEADER]), body)
    event = json.loads(body)
    assert (event["event"], event["tenant"], event["alert"]["status"]) == ("alert.opened", "alpha", "open")
    assert event["alert"]["rule"]["condition"] == "temperature greater than 30"
    assert len(receiver.requests) == 2


def test_it_gives_up_after_the_last_attempt(in_alpha: TenantPersona) -> None:
    r = Receiver([503] * 10)
    try:
        with LOOPBACK_ALLOWED, override_settings(ARGUS_WEBHOOK_MAX_ATTEMPTS=3):
            WebhookEndpoint.objects.create(name=unique_id("ops"), url=r.url)
            (delivery_id,) = watched().reading(0, temperature=35).deliveries
            for _ in range(3):
                WebhookDelivery.objects.filter(pk=delivery_id).update(next_attempt_at=timezone.now())
                delivery_attempt(delivery_id=delivery_id)
    finally:
        r.close()
    delivery = WebhookDelivery.objects.get(pk=delivery_id)
    assert (delivery.status, delivery.attempts, delivery.next_attempt_at) == (DeliveryStatus.FAILED, 3, None)
    assert "HTTP 503" in delivery.last_error


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5432/",
        "http://localhost:6379/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/hook",
        "http://[::1]:4222/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "ftp://example.com/hook",
        "http://user:pw@example.com/hook",
    ],
)
def test_it_refuses_webhooks_into_private_networks(url: str) -> None:
    assert url_errors(url) is not None


def test_it_refuses_to_send_to_an_address_that_is_not_allowed_at_sending_time(
    in_alpha: TenantPersona, receiver: Receiver
) -> None:
    # Saved while allowed (or a name that resolved elsewhere then): the check is made again when sending.
    WebhookEndpoint.objects.create(name=unique_id("ops"), url=receiver.url.replace("127.0.0.1", "localhost"))
    (delivery_id,) = watched().reading(0, temperature=35).deliveries
    delivery_attempt(delivery_id=delivery_id)
    delivery = WebhookDelivery.objects.get(pk=delivery_id)
    assert delivery.status == DeliveryStatus.PENDING and "refused" in delivery.last_error
    assert receiver.requests == []


def test_it_records_every_lifecycle_event_for_the_webhooks(in_alpha: TenantPersona, django_user_model: Any) -> None:
    from assets.alerts import alert_acknowledge

    endpoint = WebhookEndpoint.objects.create(name=unique_id("ops"), url="https://hooks.example.com/argus")
    w = watched()
    w.reading(0, temperature=35)
    alert = w.open_alert()
    assert alert is not None
    operator = django_user_model.objects.create(username=unique_id("operator"))
    acknowledged, _ = alert_acknowledge(alert_id=alert.pk, user=operator)
    assert (acknowledged.status, acknowledged.acknowledged_by) == (AlertStatus.ACKNOWLEDGED, operator)
    w.reading(1, temperature=20)
    events = list(endpoint.deliveries.order_by("pk").values_list("event", flat=True))
    assert events == ["alert.opened", "alert.acknowledged", "alert.resolved"]
    resolved = endpoint.deliveries.order_by("pk").last()
    assert resolved is not None and resolved.payload["alert"]["acknowledged_by"] == operator.username
