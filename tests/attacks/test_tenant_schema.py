"""A tenant admin's message schema is data, never code (issue 10, item 1).

The attack: fastjsonschema generated Python source from the schema, and a property name under
`dependencies` closed its string literal and ran code in every process that validated a message
(runingest, the web workers, Celery), which hold the database URL and the secret key. Performed
through the tenant's admin, the real pipeline (Mosquitto, runbridge, NATS, runingest,
PostgreSQL) and the HTTP endpoint. Then the schemas that would fetch something, recurse, or stall
a worker with a backtracking pattern: refused at save, harmless at run time.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django_tenants.utils import schema_context
from pytest_django.fixtures import SettingsWrapper

from devices.models import DeviceType
from devices.services import api_key_create
from devices.validation import MAX_PATTERNS, MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, MessageValidator
from telemetry.api.views import reset_publisher
from telemetry.models import RawStatus, TelemetryRaw
from tests.conftest import TenantPersona, make_device, make_device_type, tenant_admin_client
from tests.pipeline import Pipeline, publisher, wait_for
from tests.test_foundation import device_type_form, errors_of

# No tenant has this host: the credential alone routes an HTTP message.
PUBLIC_HOST = "ingest.example"


def injected_schema(marker: Path) -> dict[str, Any]:
    """A valid JSON Schema whose one property name is Python that writes `marker` once compiled."""
    name = f"\\\" and __import__('pathlib').Path({str(marker)!r}).write_text('x') or 1:#"
    return {
        "type": "object",
        "properties": {"values": {"type": "object", "properties": {"temperature": {"type": "number", "maximum": 100}}}},
        "dependencies": {name: {"type": "object"}},
    }


def raw_rows(schema: str, logical_id: str) -> dict[str | None, TelemetryRaw]:
    with schema_context(schema):
        return {r.msg_id: r for r in TelemetryRaw.objects.filter(logical_identifier=logical_id)}


def post(body: dict[str, Any], api_key: str) -> Any:
    client = Client(HTTP_HOST=PUBLIC_HOST)
    headers = {"Authorization": f"Api-Key {api_key}"}
    return client.generic(
        "POST", "/api/v1/telemetry", json.dumps(body), content_type="application/json", headers=headers
    )


class Listener:
    """A TCP port on the loopback that records every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.integration
def test_it_never_runs_a_tenant_schema_as_code(
    pipeline: Pipeline, alpha: TenantPersona, tmp_path: Path, settings: SettingsWrapper
) -> None:
    marker = tmp_path / "pwned"
    client = tenant_admin_client(alpha)
    form = device_type_form(message_schema=json.dumps(injected_schema(marker)))
    response = client.post("/admin/devices/devicetype/add/", form)
    assert response.status_code == 302, errors_of(response)  # a valid schema: saved, and inert
    with schema_context(alpha.schema):
        device = make_device(DeviceType.objects.get(name=form["name"]))
        api_key = api_key_create(logical_id=device.logical_identifier)[1]

    with publisher(pipeline.mqtt_url) as sender:
        sender.send(device.logical_identifier, {"msg_id": "mild", "values": {"temperature": 21}})
        sender.send(device.logical_identifier, {"msg_id": "hot", "values": {"temperature": 500}})
    rows = wait_for(
        lambda: (r := raw_rows(alpha.schema, device.logical_identifier)).keys() >= {"mild", "hot"} and r,
        what="both messages through runingest",
    )
    assert rows["mild"].status == RawStatus.ACCEPTED, rows["mild"].reason
    assert rows["hot"].status == RawStatus.REJECTED
    assert rows["hot"].reason.startswith("schema: values/temperature: 500 is greater than the maximum of 100")

    settings.NATS_URL = pipeline.nats_url
    reset_publisher()
    try:
        assert post({"values": {"temperature": 22}}, api_key).status_code == 202
        refused = post({"values": {"temperature": 600}}, api_key)
        assert refused.status_code == 400
        assert "schema: values/temperature" in refused.json()["detail"]
    finally:
        reset_publisher()
    assert not marker.exists(), "the schema ran as code"


@pytest.mark.integration
def test_it_checks_a_catastrophically_backtracking_pattern_in_linear_time(
    pipeline: Pipeline, alpha: TenantPersona
) -> None:
    # Python's `re` needs about 2**n steps for n letters here; 50,000 of them would stall
    # runingest for good. The schema is accepted: its patterns run on a linear-time engine.
    with schema_context(alpha.schema):
        device = make_device(
            make_device_type(message_schema={"properties": {"note": {"type": "string", "pattern": "^(a+)+$"}}})
        )
    started = time.monotonic()
    with publisher(pipeline.mqtt_url) as sender:
        evil = {"msg_id": "evil", "note": "a" * 50_000 + "!", "values": {"temperature": 1}}
        sender.send(device.logical_identifier, evil)
        sender.send(device.logical_identifier, {"msg_id": "next", "note": "aaaa", "values": {"temperature": 2}})
    rows = wait_for(
        lambda: (r := raw_rows(alpha.schema, device.logical_identifier)).keys() >= {"evil", "next"} and r,
        what="both messages through runingest",
    )
    assert time.monotonic() - started < 15
    assert rows["evil"].status == RawStatus.REJECTED
    assert rows["evil"].reason.startswith("schema: note: ")
    assert rows["next"].status == RawStatus.ACCEPTED, rows["next"].reason


def deep_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(levels):
        schema = {"not": schema}
    return schema


def doubling_schema(levels: int) -> dict[str, Any]:
    """Each definition uses the next twice: 2**levels checks per message once references are followed."""
    defs: dict[str, Any] = {f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(levels)}
    defs[f"d{levels}"] = {"type": "number"}
    return {"$defs": defs, "properties": {"values": {"$ref": "#/$defs/d0"}}}


def refused_schemas(listener: Listener) -> list[tuple[str, dict[str, Any], str]]:
    return [
        ("remote $ref", {"$ref": f"{listener.url}/schema.json"}, "only references within the schema"),
        ("relative $ref", {"$id": f"{listener.url}/root.json", "$ref": "other.json"}, "only references within"),
        ("remote $schema", {"$schema": f"{listener.url}/meta"}, "not a JSON Schema draft"),
        ("nested $schema", {"properties": {"a": {"$schema": f"{listener.url}/meta"}}}, "not a JSON Schema draft"),
        ("embedded resource", {"$defs": {"a": {"$id": f"{listener.url}/a"}}}, "only the root may have one"),
        ("self reference", {"properties": {"values": {"$ref": "#"}}}, "recursive references are not allowed"),
        (
            "mutual references",
            {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"items": {"$ref": "#/$defs/a"}}}, "$ref": "#/$defs/a"},
            "recursive references are not allowed",
        ),
        ("references that multiply", doubling_schema(40), "to more than"),
        ("reference into data", {"enum": [{"$ref": "#"}], "$ref": "#/enum/0"}, "names something that is not a schema"),
        ("dynamic reference", {"$dynamicAnchor": "n", "items": {"$dynamicRef": "#n"}}, "recursive references"),
        ("unknown pointer", {"$ref": "#/$defs/nothing"}, "names nothing in the schema"),
        ("look-around", {"properties": {"id": {"pattern": "^(?=.*a)"}}}, "linear-time engine"),
        ("back-reference", {"properties": {"id": {"pattern": "^(a+)\\1$"}}}, "linear-time engine"),
        ("huge pattern", {"properties": {"id": {"pattern": "\\w{5000}"}}}, "linear-time engine"),
        (
            "too many patterns",
            {"patternProperties": {f"^p{i}$": {"pattern": "^[a-z]+$"} for i in range(MAX_PATTERNS // 2 + 1)}},
            f"at most {MAX_PATTERNS}",
        ),
        ("too deep", deep_schema(MAX_SCHEMA_DEPTH), f"more than {MAX_SCHEMA_DEPTH} levels"),
        (
            "too large",
            {"properties": {f"p{i}": {"description": "x" * 1000} for i in range(MAX_SCHEMA_BYTES // 1000)}},
            f"at most {MAX_SCHEMA_BYTES:,}",
        ),
    ]


def test_it_refuses_schemas_that_reach_out_recurse_or_can_stall_a_worker(
    db: None, alpha: TenantPersona, listener: Listener
) -> None:
    client = tenant_admin_client(alpha)
    for name, schema, expected in refused_schemas(listener):
        response = client.post("/admin/devices/devicetype/add/", device_type_form(message_schema=json.dumps(schema)))
        messages = errors_of(response).get("message_schema", [])
        assert any(expected in m for m in messages), (name, messages)
    time.sleep(0.2)
    assert listener.connections == 0, "a schema made the server connect somewhere"


def test_it_rejects_every_message_of_a_type_whose_stored_schema_is_refused(
    in_alpha: TenantPersona, listener: Listener
) -> None:
    # Saved past clean() (before these checks existed, or with a queryset update): the schema is
    # still never fetched from, recursed into or compiled; the device's messages are refused.
    device = make_device(make_device_type())
    DeviceType.objects.filter(pk=device.device_type_id).update(message_schema={"$ref": f"{listener.url}/x.json"})
    api_key = api_key_create(logical_id=device.logical_identifier)[1]
    response = post({"values": {"temperature": 20}}, api_key)
    assert response.status_code == 400
    assert "message schema is refused: $ref" in response.json()["detail"]
    with schema_context(in_alpha.schema):  # the request left the connection on the public schema
        DeviceType.objects.filter(pk=device.device_type_id).update(message_schema={"items": {"$ref": "#"}})
    response = post({"values": {"temperature": 20}}, api_key)
    assert response.status_code == 400
    assert "recursive references are not allowed" in response.json()["detail"]
    assert listener.connections == 0


def test_it_still_checks_messages_with_every_draft_2020_12_keyword_it_allows() -> None:
    # The interpreter, not a subset: keywords fastjsonschema did not know, shared definitions,
    # anchors, and patterns in Unicode classes.
    validator = MessageValidator(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$defs": {"reading": {"$anchor": "reading", "type": "number", "minimum": -60}},
            "type": "object",
            "properties": {
                "values": {
                    "type": "object",
                    "properties": {"temperature": {"$ref": "#reading"}, "humidity": {"$ref": "#/$defs/reading"}},
                    "unevaluatedProperties": False,
                },
                "site": {"type": "string", "pattern": "^\\p{Lu}[\\p{L} ]*$"},
                "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
            },
            "dependentRequired": {"site": ["values"]},
        }
    )
    assert validator.error({"values": {"temperature": 21.5, "humidity": 40}, "site": "Åbo", "pair": ["a", 1]}) is None
    assert (
        validator.error({"values": {"temperature": -100}})
        == "schema: values/temperature: -100 is less than the minimum of -60"
    )
    assert validator.error({"values": {"pressure": 1}}).startswith("schema: values: Unevaluated properties")  # type: ignore[union-attr]
    assert validator.error({"site": "lower"}).startswith("schema: ")  # type: ignore[union-attr]
    assert validator.error({"pair": [1, "a"]}).startswith("schema: pair/0: ")  # type: ignore[union-attr]
