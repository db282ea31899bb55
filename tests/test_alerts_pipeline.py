"""Alerts, health and webhooks through the real processes: a device publishes over MQTT, runbridge
and runingest store it, the Celery worker (two processes) evaluates the rule and scores the asset,
beat's sweep retries the webhook, and a receiver on loopback checks every signature."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from django_tenants.utils import schema_context

from assets.models import Alert, AlertStatus, Asset, AssetDevice, AssetType, Resolution, ThresholdRule, WebhookEndpoint
from assets.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from devtools.services import ServerHandle
from tests.conftest import TenantPersona, make_device, make_device_type, unique_id
from tests.pipeline import Celery, Pipeline, publisher, wait_for
from tests.test_alerts import Receiver

pytestmark = pytest.mark.integration

ALERT_ENV = {
    "ARGUS_ALERT_SWEEP_SECONDS": "1",
    "ARGUS_HEALTH_DEBOUNCE_SECONDS": "0.5",
    "ARGUS_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
    "ARGUS_WEBHOOK_RETRY_BASE_SECONDS": "1",
}


@pytest.fixture
def platform(broker: ServerHandle, nats_server: ServerHandle, live_db: None, tmp_path: Path) -> Iterator[Pipeline]:
    pipeline = Pipeline(broker, nats_server, tmp_path, extra_env=ALERT_ENV)
    celery = Celery(pipeline.env, tmp_path)
    try:
        pipeline.start()
        celery.start()
        yield pipeline
    finally:
        try:
            celery.stop()
        finally:
            pipeline.stop()


def test_it_opens_notifies_scores_and_resolves_through_the_real_processes(
    platform: Pipeline, alpha: TenantPersona
) -> None:
    receiver = Receiver([500])  # the first delivery fails: the sweep retries it
    try:
        with schema_context(alpha.schema):
            device = make_device(make_device_type(message_schema={}))
            asset_type = AssetType.objects.create(
                name=unique_id("cold-room"),
                metric_definitions=[{"key": "temperature", "min": -25, "max": -15}],
                health_algorithm="threshold",
                health_parameters={},
            )
            asset = Asset.objects.create(asset_type=asset_type, name=unique_id("cold-room"))
            AssetDevice.objects.create(asset=asset, device=device)
            rule = ThresholdRule.objects.create(
                name=unique_id("warm"),
                asset_type=asset_type,
                metric="temperature",
                operator="gt",
                threshold=-15,
                hysteresis=1,
                duration_seconds=2,
                severity="critical",
            )
            endpoint = WebhookEndpoint.objects.create(name=unique_id("ops"), url=receiver.url)

        def open_alert() -> Alert | None:
            with schema_context(alpha.schema):
                return Alert.objects.filter(rule=rule, asset=asset).exclude(status=AlertStatus.RESOLVED).first()

        def score() -> Decimal | None:
            with schema_context(alpha.schema):
                return Asset.objects.get(pk=asset.pk).health_score

        start = int(time.time() * 1000)
        with publisher(platform.mqtt_url) as sender:
            sender.send(device.logical_identifier, {"msg_id": "w0", "ts": start, "values": {"temperature": -12}})
            time.sleep(1)
            assert open_alert() is None  # breaching for less than the duration
            for i in range(1, 4):
                sender.send(
                    device.logical_identifier,
                    {"msg_id": f"w{i}", "ts": start + i * 1000, "values": {"temperature": -12}},
                )
                time.sleep(0.3)
            alert = wait_for(open_alert, what="the alert to open")
            assert (alert.value, alert.severity) == (-12.0, "critical")
            wait_for(lambda: score() == Decimal("50.00"), what=lambda: f"the score to fall to 50 (it is {score()})")

            sender.send(
                device.logical_identifier, {"msg_id": "c0", "ts": start + 5000, "values": {"temperature": -15.5}}
            )
            time.sleep(1.5)
            assert open_alert() is not None  # inside the hysteresis band
            sender.send(device.logical_identifier, {"msg_id": "c1", "ts": start + 6000, "values": {"temperature": -20}})
            wait_for(lambda: open_alert() is None, what="the alert to resolve")
            wait_for(lambda: score() == Decimal("100.00"), what=lambda: f"the score back at 100 (it is {score()})")

        def events() -> list[str]:
            return [json.loads(body)["event"] for _, body in receiver.requests]

        wait_for(lambda: events().count("alert.resolved") == 1, timeout=30, what=lambda: f"both events, got {events()}")
    finally:
        receiver.close()
    # 500 to the first attempt, then the sweep's retry, then the resolution: three requests.
    assert events() == ["alert.opened", "alert.opened", "alert.resolved"]
    for headers, body in receiver.requests:
        assert headers[SIGNATURE_HEADER] == sign(endpoint.secret, int(headers[TIMESTAMP_HEADER]), body)
    with schema_context(alpha.schema):
        (resolved,) = Alert.objects.filter(rule=rule, asset=asset)
        assert (resolved.status, resolved.resolution, resolved.last_value) == (
            AlertStatus.RESOLVED,
            Resolution.AUTO,
            -20.0,
        )
        assert list(endpoint.deliveries.values_list("status", flat=True).order_by("pk")) == ["delivered", "delivered"]
