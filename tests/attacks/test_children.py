"""Gateway children (issue 10, item 7): a child id is a logical id like any other, registered
atomically, and a gateway cannot claim another tenant's device.

A gateway used to be able to register any string as a child (a `/` or `#` in what becomes an
MQTT topic level, 300 characters in a 128-character column), a child id owned by another tenant
rejected the whole message, and two tenants' gateways naming the same new id at once both got it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import orjson
import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone
from django_tenants.utils import schema_context

from argus.models import DeviceRegistration
from devices.models import Device, ProcessingMode
from devices.services import api_key_create
from telemetry.ingest import ingest_batch
from telemetry.messages import BatchResult, IncomingMessage
from telemetry.models import RawStatus, TelemetryHistory, TelemetryRaw
from telemetry.profiles import ProfileCache
from tests.conftest import TenantPersona, make_device, make_device_type, unique_id
from tests.pipeline import Pipeline, publisher, wait_for

NOW_MS: Callable[[], int] = lambda: int(time.time() * 1000)  # noqa: E731


def make_gateway() -> Device:
    gateway_type = make_device_type(
        processing_mode=ProcessingMode.GATEWAY, metrics=["rssi"], auto_register_children=True, message_schema={}
    )
    return make_device(gateway_type, device_role="gateway")


def raw_rows(schema: str, logical_id: str) -> list[TelemetryRaw]:
    with schema_context(schema):
        return list(TelemetryRaw.objects.filter(logical_identifier=logical_id).order_by("id"))


@pytest.mark.integration
def test_it_refuses_another_tenants_child_and_stores_the_rest_of_the_message(
    pipeline: Pipeline, alpha: TenantPersona, beta: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        gateway = make_gateway()
    with schema_context(beta.schema):
        betas = make_device(make_device_type())
    mine = unique_id("BEACON")
    with publisher(pipeline.mqtt_url) as sender:
        sender.send(
            gateway.logical_identifier,
            {
                "msg_id": "mixed",
                "ts": NOW_MS(),
                "children": [
                    {"id": betas.logical_identifier, "values": {"rssi": -1}},
                    {"id": mine, "values": {"rssi": -42}},
                ],
            },
        )
    rows = wait_for(lambda: raw_rows(alpha.schema, gateway.logical_identifier), what="the gateway's raw row")
    assert rows[0].status == RawStatus.ACCEPTED and rows[0].readings == 1
    assert f"child device {betas.logical_identifier} is owned by another tenant" in rows[0].reason
    with schema_context(alpha.schema):
        child = Device.objects.get(logical_identifier=mine)
        assert child.parent_device_id == gateway.pk
        assert list(TelemetryHistory.objects.filter(device_id=child.pk).values_list("value", flat=True)) == [-42.0]
        assert not Device.objects.filter(logical_identifier=betas.logical_identifier).exists()
    with schema_context(beta.schema):
        assert not TelemetryRaw.objects.filter(logical_identifier=betas.logical_identifier).exists()
        assert not TelemetryHistory.objects.filter(device_id=betas.pk).exists()


BAD_CHILD_IDS = ["a/b", "+", "#", "DEV 1", "-leading-dash", "DEV-1\n", "é", "C\x00", "L" * 129, "L" * 300]


@pytest.mark.integration
def test_it_rejects_child_ids_that_are_not_logical_ids(pipeline: Pipeline, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        gateway = make_gateway()
    with publisher(pipeline.mqtt_url) as sender:
        for i, child_id in enumerate(BAD_CHILD_IDS):
            good = unique_id("OK")
            sender.send(
                gateway.logical_identifier,
                {
                    "msg_id": f"bad-{i}",
                    "children": [{"id": good, "values": {"rssi": 1}}, {"id": child_id, "values": {"rssi": 2}}],
                },
            )
    rows = wait_for(
        lambda: (r := raw_rows(alpha.schema, gateway.logical_identifier)) and len(r) == len(BAD_CHILD_IDS) and r,
        what=lambda: f"{len(BAD_CHILD_IDS)} rejected rows: {pipeline.ingest.log()}",
    )
    assert all(r.status == RawStatus.REJECTED and "children[1].id" in r.reason for r in rows), [r.reason for r in rows]
    assert all("is not a valid device id" in r.reason for r in rows), [r.reason for r in rows]
    with schema_context(alpha.schema):
        # Nothing registered, not even the message's good child (the message is malformed).
        assert not Device.objects.filter(parent_device=gateway).exists()
    assert pipeline.ingest.running()


def test_it_answers_400_for_a_child_id_that_is_not_a_logical_id(in_alpha: TenantPersona) -> None:
    gateway = make_gateway()
    key = api_key_create(logical_id=gateway.logical_identifier)[1]
    client = Client(HTTP_HOST="ingest.example")
    for child_id in BAD_CHILD_IDS:
        body = orjson.dumps({"children": [{"id": child_id, "values": {"rssi": 1}}]})
        response = client.generic(
            "POST",
            "/api/v1/telemetry",
            body,
            content_type="application/json",
            headers={"Authorization": f"Api-Key {key}"},
        )
        assert response.status_code == 400, (child_id, response.content)
        assert "is not a valid device id" in response.json()["detail"]


def _ingest_in(
    schema: str, gateway: Device, children: list[str], start: threading.Barrier, out: list[BatchResult]
) -> None:
    """One tenant's ingest, on its own connection, as another runingest process would be."""
    try:
        payload = orjson.dumps({"ts": NOW_MS(), "children": [{"id": c, "values": {"rssi": -50}} for c in children]})
        message = IncomingMessage(
            key=uuid.uuid4().hex, logical_id=gateway.logical_identifier, received_at=timezone.now(), payload=payload
        )
        with schema_context(schema):
            start.wait(10)
            out.append(ingest_batch(messages=[message], profiles=ProfileCache()))
    finally:
        connection.close()


@pytest.mark.integration
def test_it_registers_a_child_id_named_by_two_tenants_at_once_in_exactly_one(
    live_db: None, alpha: TenantPersona, beta: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        alphas = make_gateway()
    with schema_context(beta.schema):
        betas = make_gateway()
    for _ in range(4):
        contested = [unique_id("CONTESTED") for _ in range(200)]
        start = threading.Barrier(2)
        results: list[BatchResult] = []
        threads = [
            threading.Thread(target=_ingest_in, args=(alpha.schema, alphas, contested, start, results)),
            threading.Thread(target=_ingest_in, args=(beta.schema, betas, list(reversed(contested)), start, results)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(results) == 2
        owners = dict(
            DeviceRegistration.objects.filter(logical_identifier__in=contested).values_list(
                "logical_identifier", "tenant__schema_name"
            )
        )
        assert set(owners) == set(contested)
        for persona, gateway in ((alpha, alphas), (beta, betas)):
            with schema_context(persona.schema):
                here = set(
                    Device.objects.filter(logical_identifier__in=contested).values_list("logical_identifier", flat=True)
                )
                # A device row in a tenant exactly when the registry gives the id to that tenant.
                assert here == {c for c, schema in owners.items() if schema == persona.schema}
                stored = TelemetryHistory.objects.filter(
                    device_id__in=Device.objects.filter(logical_identifier__in=contested)
                )
                assert stored.count() == len(here)
                if len(here) < len(contested):
                    row = TelemetryRaw.objects.filter(logical_identifier=gateway.logical_identifier).latest("id")
                    assert "is owned by another tenant" in row.reason
