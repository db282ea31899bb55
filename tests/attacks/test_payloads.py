"""Hostile payloads (issue 10, items 3 and 4): nothing a device sends crashes a worker or fails
its batch.

Every protocol adapter, the ingest service and the HTTP endpoint are fed deep nesting (past the
decoder's limit), huge and non-finite numbers, duplicate keys, lone surrogates, NUL characters,
over-long keys and ids, wrong types at every level and bytes that are not UTF-8. Each message
must end as a raw row (rejected with its reason, or accepted), other devices' messages in the
same batch untouched; over HTTP a 400 (or 413), never a 500, and never a 202 for a message the
database would refuse. The real pipeline (runbridge, runingest, Mosquitto, NATS) gets the same
treatment, and schemathesis checks that the endpoint and its OpenAPI schema agree.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.test import Client
from django.utils import timezone
from django_tenants.utils import schema_context
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pytest_django.fixtures import SettingsWrapper
from schemathesis.generation.modes import GenerationMode

from devices.models import Device, ProcessingMode, ProtocolAdapter
from devices.services import api_key_create
from devtools.services import ServerHandle
from telemetry.adapters import ADAPTERS, Rejected, load_json
from telemetry.api.views import reset_publisher
from telemetry.consumer import Delivery, IngestConsumer
from telemetry.ingest import ingest_batch
from telemetry.messages import IncomingMessage
from telemetry.models import RawStatus, TelemetryHistory, TelemetryRaw
from telemetry.profiles import ProfileCache
from tests.conftest import TenantPersona, make_device, make_device_type, unique_id
from tests.pipeline import Pipeline, publisher, wait_for
from tests.test_pipeline import read_deadletters

PUBLIC_HOST = "ingest.example"
HYPOTHESIS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- hostile payloads


class Raw(str):
    """JSON text put into a payload as is: what json.dumps cannot write (NaN, 1e400, a lone
    surrogate escape, duplicate keys, nesting deeper than Python's recursion limit)."""


def dump(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return (
            "{"
            + ",".join(f"{dump(k) if isinstance(k, Raw) else json.dumps(k)}:{dump(v)}" for k, v in value.items())
            + "}"
        )
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)  # ASCII: a NUL or a lone surrogate becomes its \\u escape


def nested(depth: int, inner: str = "1") -> Raw:
    return Raw("[" * depth + inner + "]" * depth)


def nested_objects(depth: int) -> Raw:
    return Raw('{"a":' * depth + "1" + "}" * depth)


HOSTILE_RAW = [
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("1e400"),
    Raw("-1e999"),
    Raw("1" + "0" * 400),
    Raw("123456789012345678901234567890"),
    Raw('"\\ud800"'),
    Raw('"x\\udfffy"'),
    Raw('"\\u0000"'),
    Raw('{"temperature": 1, "temperature": "hot"}'),
    Raw('{"id": "A", "id": 5, "values": {"rssi": 1}}'),
    nested(1023),
    nested(1024),
    nested(1025),
    nested(5000),
    nested_objects(1100),
]
ID_CHARS = "ABCXYZ0123456789._:-"
hostile_strings = st.one_of(
    st.text(max_size=8).map(lambda s: s + "\x00"),
    st.sampled_from(["\x00", "a\x00b", "DEV-\x00", "", " ", "a/b", "+", "#", "DEV-1\n", "é", "\U0001f525"]),
    st.text(alphabet=ID_CHARS, min_size=129, max_size=300),
    st.text(alphabet=ID_CHARS, min_size=4000, max_size=6000),
    st.text(max_size=30),
)
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)
any_json = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
hostile_values = st.one_of(any_json, hostile_strings, st.sampled_from(HOSTILE_RAW))


def template(kind: str, uid: str, now_ms: int) -> Any:
    """A valid message of the kind, to be mutated."""
    children = [
        {"id": f"C-{uid}", "values": {"rssi": -60, "battery": 90}},
        {"id": f"D-{uid}", "ts": now_ms, "values": {"rssi": -61}},
    ]
    return {
        "endpoint": {"msg_id": uid, "ts": now_ms, "values": {"temperature": 21.5, "humidity": 40.0}},
        "endpoint_list": [
            {"ts": now_ms, "values": {"temperature": 1.0}},
            {"ts": now_ms - 1, "values": {"humidity": 2}},
        ],
        "flat": {"msg_id": uid, "ts": now_ms, "temperature": 21.5},
        "gateway": {"msg_id": uid, "ts": now_ms, "children": children},
        "chunk": {"msg_id": uid, "transaction_id": uid, "chunk": 0, "total": 2, "ts": now_ms, "children": children},
    }[kind]


def _places(document: Any) -> list[tuple[Any, Any]]:
    """(container, key or index) of every value in the document."""
    found: list[tuple[Any, Any]] = []
    if isinstance(document, dict):
        for key, value in document.items():
            found.append((document, key))
            found += _places(value)
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found.append((document, index))
            found += _places(value)
    return found


@st.composite
def hostile_payloads(draw: st.DrawFn, kind: str) -> bytes:
    """A message of the kind with one to three hostile mutations: a value replaced (wrong type,
    NUL, huge number, deep nesting...), a key renamed, the whole document replaced, or bytes
    that are not UTF-8 spliced in."""
    document: Any = template(kind, uuid.uuid4().hex[:12], int(time.time() * 1000))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        places = _places(document)
        action = draw(st.sampled_from(["text", "text", "replace", "replace", "rename", "root"]))
        if action == "root" or not places:
            document = draw(hostile_values)
            continue
        if action == "text":
            # A string that reaches a column (msg_id, a child id, a transaction id) or a metric name.
            texts = [p for p in places if isinstance(p[0], dict) and p[1] in TEXT_FIELDS] or places
            container, key = draw(st.sampled_from(texts))
            if draw(st.booleans()) and isinstance(container, dict) and isinstance(container.get("values"), dict):
                container["values"][draw(hostile_strings)] = 1
            else:
                container[key] = draw(hostile_strings)
            continue
        container, key = draw(st.sampled_from(places))
        if action == "rename" and isinstance(container, dict):
            new_key = draw(st.one_of(hostile_strings, st.sampled_from([Raw('"\\ud800"'), Raw('"\\u0000"')])))
            container[new_key] = container.pop(key)
        else:
            container[key] = draw(hostile_values)
    payload = dump(document).encode()
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"]))
        at = draw(st.integers(min_value=0, max_value=len(payload)))
        payload = payload[:at] + bad + payload[at:]
    return payload


TEXT_FIELDS = {"msg_id", "id", "transaction_id", "ts"}
KINDS = ["endpoint", "endpoint_list", "flat", "gateway", "chunk"]


# --------------------------------------------------------------------------- the decoder's limit


def test_it_pins_the_decoders_depth_limit() -> None:
    # The adapters rely on orjson refusing nesting deeper than 1,024 (with a JSONDecodeError, which
    # they turn into a rejection): an upgrade that changes that must fail here, not in a worker.
    assert orjson.loads(str(nested(1024))) is not None
    with pytest.raises(orjson.JSONDecodeError, match="recursion"):
        orjson.loads(str(nested(1025)))
    with pytest.raises(orjson.JSONDecodeError, match="recursion"):
        orjson.loads(str(nested_objects(1025)))
    with pytest.raises(Rejected, match="malformed JSON"):
        load_json(nested(100_000).encode())


# --------------------------------------------------------------------------- every adapter


@settings(HYPOTHESIS, max_examples=300)
@given(data=st.data())
def test_it_only_ever_decodes_or_rejects_in_every_adapter(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(KINDS))
    payload = data.draw(hostile_payloads(kind))
    adapter = data.draw(st.sampled_from(sorted(ADAPTERS)))
    mode = data.draw(st.sampled_from(list(ProcessingMode)))
    try:
        decoded = ADAPTERS[adapter](payload, mode, timezone.now(), 100)
    except Rejected as exc:
        assert exc.reason
        return
    # What was decoded can be stored: no NUL in any text that reaches a column, ids within theirs.
    assert decoded.msg_id is None or ("\x00" not in decoded.msg_id and len(decoded.msg_id) <= 200)
    for reading in decoded.readings:
        assert all("\x00" not in metric and len(metric) <= 64 for metric in reading.values)
        if reading.child_id is not None:
            assert "\x00" not in reading.child_id and len(reading.child_id) <= 128
    if decoded.chunk is not None:
        assert "\x00" not in decoded.chunk.transaction_id


# --------------------------------------------------------------------------- ingest, in one batch


@dataclass
class Fleet:
    """One device of every kind in tenant alpha, and a neighbour sending good messages."""

    devices: dict[str, Device]
    neighbour: Device


def make_fleet() -> Fleet:
    endpoint_type = make_device_type()
    gateway_type = make_device_type(
        processing_mode=ProcessingMode.GATEWAY, metrics=["rssi", "battery"], auto_register_children=True
    )
    chunked_type = make_device_type(
        processing_mode=ProcessingMode.GATEWAY_CHUNKED, metrics=["rssi", "battery"], auto_register_children=True
    )
    flat_type = make_device_type(protocol_adapter=ProtocolAdapter.FLAT_JSON, message_schema={})
    endpoint = make_device(endpoint_type)
    return Fleet(
        devices={
            "endpoint": endpoint,
            "endpoint_list": endpoint,
            "flat": make_device(flat_type),
            "gateway": make_device(gateway_type, device_role="gateway"),
            "chunk": make_device(chunked_type, device_role="gateway"),
        },
        neighbour=make_device(make_device_type()),
    )


def good_payload(n: int) -> bytes:
    return orjson.dumps({"msg_id": f"good-{uuid.uuid4().hex}", "values": {"temperature": n}})


def message(device: Device, payload: bytes, received_at: datetime) -> IncomingMessage:
    return IncomingMessage(
        key=uuid.uuid4().hex, logical_id=device.logical_identifier, received_at=received_at, payload=payload
    )


@pytest.fixture
def fleet(in_alpha: TenantPersona) -> Fleet:
    return make_fleet()


@HYPOTHESIS
@given(data=st.data())
def test_it_stores_every_hostile_message_as_a_row_and_its_neighbours_untouched(
    in_alpha: TenantPersona, fleet: Fleet, data: st.DataObject
) -> None:
    kind = data.draw(st.sampled_from(KINDS))
    payload = data.draw(hostile_payloads(kind))
    device = fleet.devices[kind]
    received_at = timezone.now()
    batch = [
        message(fleet.neighbour, good_payload(1), received_at),
        message(device, payload, received_at),
        message(fleet.neighbour, good_payload(2), received_at + timedelta(microseconds=1)),
    ]
    # Before the fix, a NUL or an over-long child id raised here (the database refused the batch's
    # COPY) and the whole envelope was redelivered into the dead letters.
    result = ingest_batch(messages=batch, profiles=ProfileCache())
    assert result.accepted + result.rejected + result.chunks + result.duplicates == 3
    good = TelemetryRaw.objects.filter(
        logical_identifier=fleet.neighbour.logical_identifier, received_at__gte=received_at
    ).order_by("id")
    assert [row.status for row in good] == [RawStatus.ACCEPTED, RawStatus.ACCEPTED]
    assert TelemetryHistory.objects.filter(raw_id__in=[row.pk for row in good]).count() == 2
    hostile = TelemetryRaw.objects.filter(logical_identifier=device.logical_identifier, received_at=received_at)
    for row in hostile:  # none when its msg_id repeats an earlier example's (a duplicate)
        assert bytes(row.payload) == payload
        assert row.status in (RawStatus.ACCEPTED, RawStatus.REJECTED, RawStatus.CHUNK, RawStatus.IGNORED)
        assert row.status != RawStatus.REJECTED or row.reason


@pytest.mark.integration
def test_it_stores_a_message_the_database_refuses_as_rejected_instead_of_retrying_it(
    live_db: None, alpha: TenantPersona
) -> None:
    # The last line of defence, for a value the adapters let through: here a logical id longer
    # than its column, as only a tampered envelope could carry. (Committed data: the consumer
    # manages its own connection.)
    with schema_context(alpha.schema):
        neighbour = make_device(make_device_type())
    received_at = timezone.now()
    refused = IncomingMessage(key=uuid.uuid4().hex, logical_id="X" * 200, received_at=received_at, payload=b"{}")
    good = message(neighbour, good_payload(3), received_at)
    delivery = Delivery(msg=None, schema=alpha.schema, messages=[good, refused], deliveries=1)  # type: ignore[arg-type]
    consumer = IngestConsumer(profiles=ProfileCache())
    try:
        stored = consumer._store({alpha.schema: [delivery]})
    finally:
        consumer._db.shutdown()
    assert not stored.failed and not stored.unknown and not stored.held
    assert stored.results[alpha.schema].accepted == 1 and stored.results[alpha.schema].rejected == 1
    with schema_context(alpha.schema):
        row = TelemetryRaw.objects.get(logical_identifier="X" * 128, received_at=received_at)
    assert row.status == RawStatus.REJECTED and row.reason.startswith("the database refused a value"), row.reason
    assert bytes(row.payload) == b"{}"


# --------------------------------------------------------------------------- the HTTP endpoint


@pytest.fixture
def http_nats(nats_server: ServerHandle, settings: SettingsWrapper) -> Iterator[str]:
    """The endpoint publishes to a private NATS."""
    settings.NATS_URL = nats_server.url
    settings.ARGUS_HTTP_RATE_LIMIT = "100000/min"
    reset_publisher()
    yield nats_server.url
    reset_publisher()


def post(body: bytes, key: str) -> Any:
    client = Client(HTTP_HOST=PUBLIC_HOST, enforce_csrf_checks=True)
    return client.generic(
        "POST", "/api/v1/telemetry", body, content_type="application/json", headers={"Authorization": f"Api-Key {key}"}
    )


@HYPOTHESIS
@given(data=st.data())
def test_it_answers_400_never_500_nor_202_for_what_cannot_be_stored(
    in_alpha: TenantPersona, fleet: Fleet, http_nats: str, data: st.DataObject
) -> None:
    keys = _keys(fleet)
    kind = data.draw(st.sampled_from(KINDS))
    payload = data.draw(hostile_payloads(kind))
    response = post(payload, keys[kind])
    assert response.status_code in (202, 400, 413), response.content
    if response.status_code != 202:
        assert response["Content-Type"] == "application/problem+json"
        assert response.json()["detail"]
        return
    # 202: ingest must be able to store it (the endpoint does not check reading times).
    received_at = timezone.now()
    with schema_context(in_alpha.schema):
        result = ingest_batch(messages=[message(fleet.devices[kind], payload, received_at)], profiles=ProfileCache())
        rows = list(
            TelemetryRaw.objects.filter(
                logical_identifier=fleet.devices[kind].logical_identifier, received_at=received_at
            )
        )
    assert result.accepted + result.chunks + result.rejected + result.duplicates == 1
    for row in rows:
        assert row.status != RawStatus.REJECTED or "too far from the receive time" in row.reason, row.reason


_fleet_keys: dict[int, dict[str, str]] = {}


def _keys(fleet: Fleet) -> dict[str, str]:
    """An API key per kind (made once per fleet: hypothesis runs the test body many times)."""
    found = _fleet_keys.get(id(fleet))
    if found is None:
        found = _fleet_keys[id(fleet)] = {
            kind: api_key_create(logical_id=device.logical_identifier)[1] for kind, device in fleet.devices.items()
        }
    return found


# --------------------------------------------------------------------------- the real pipeline


def hostile_corpus(gateway: str, chunked: str, endpoint: str) -> list[tuple[str, bytes, str]]:
    """(device, payload, expected reason) sent over MQTT."""
    now = int(time.time() * 1000)
    long_id = "L" * 200
    return [
        (endpoint, b'{"msg_id": "nul\\u0000", "values": {"temperature": 1}}', "msg_id contains a NUL"),
        (endpoint, b'{"msg_id": "nulkey", "values": {"t\\u0000": 1}}', "metric name contains a NUL"),
        (endpoint, b'{"msg_id": "deep", "values": ' + nested(1025).encode() + b"}", "malformed JSON"),
        (endpoint, b'{"msg_id": "deep2", "values": {"temperature": ' + nested(1020).encode() + b"}}", "not a number"),
        (endpoint, b'{"msg_id": "sur", "values": {"temperature": 1}, "x": "\\ud800"}', "malformed JSON"),
        (endpoint, b'{"msg_id": "big", "values": {"temperature": 1' + b"0" * 400 + b"}}", "malformed JSON"),
        (endpoint, b'{"msg_id": "dup", "values": {"temperature": 1, "temperature": "x"}}', "not a number"),
        (endpoint, b"\xff\xfe not utf-8", "not valid UTF-8"),
        (endpoint, b'{"msg_id": "utf", "values": {"temp\xed\xa0\x80": 1}}', "not valid UTF-8"),
        (endpoint, b'{"msg_id": "oversized", "values": {"x": 1}, "pad": "' + b"x" * 300_000 + b'"}', "exceeds"),
        (
            gateway,
            orjson.dumps({"msg_id": "g-nul", "ts": now, "children": [{"id": "C\x00", "values": {"rssi": 1}}]}),
            "not a valid device id",
        ),
        (
            gateway,
            orjson.dumps({"msg_id": "g-long", "ts": now, "children": [{"id": long_id, "values": {"rssi": 1}}]}),
            "not a valid device id",
        ),
        (gateway, orjson.dumps({"msg_id": "g-type", "children": [{"id": 7, "values": {"rssi": 1}}]}), "id must be"),
        (
            chunked,
            orjson.dumps(
                {"transaction_id": "t\x00", "chunk": 0, "total": 2, "children": [{"id": "A", "values": {"r": 1}}]}
            ),
            "transaction_id contains a NUL",
        ),
    ]


@pytest.mark.integration
def test_it_keeps_the_pipeline_running_and_rejects_each_hostile_message_with_its_reason(
    pipeline: Pipeline, alpha: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        fleet = make_fleet()
    corpus = hostile_corpus(
        fleet.devices["gateway"].logical_identifier,
        fleet.devices["chunk"].logical_identifier,
        fleet.devices["endpoint"].logical_identifier,
    )
    neighbour = fleet.neighbour.logical_identifier
    with publisher(pipeline.mqtt_url) as sender:
        for i, (device, payload, _) in enumerate(corpus):
            sender.send(neighbour, {"msg_id": f"n-{i}", "values": {"temperature": i}}, wait=False)
            sender.send(device, payload, wait=False)
        sender.send(unique_id("NO-SUCH-DEVICE"), b"\xff oversized or not, nobody's")
        sender.send(neighbour, {"msg_id": "last", "values": {"temperature": 99}})

    senders = {device for device, _, _ in corpus}

    def rows() -> list[TelemetryRaw]:
        with schema_context(alpha.schema):
            return list(TelemetryRaw.objects.filter(logical_identifier__in=senders))

    wait_for(
        lambda: len(rows()) >= len(corpus),
        timeout=30,
        what=lambda: f"{len(corpus)} rows, {len(rows())} so far: {pipeline.ingest.log()}",
    )
    stored = rows()
    assert len(stored) == len(corpus)
    for device, payload, reason in corpus:
        kept = payload[: 256 * 1024]
        matching = [r for r in stored if r.logical_identifier == device and bytes(r.payload) == kept]
        assert len(matching) == 1, reason
        assert matching[0].status == RawStatus.REJECTED and reason in matching[0].reason, (reason, matching[0].reason)
    with schema_context(alpha.schema):
        good = TelemetryRaw.objects.filter(logical_identifier=neighbour, status=RawStatus.ACCEPTED)
        assert sorted(str(m) for m in good.values_list("msg_id", flat=True)) == sorted(
            [f"n-{i}" for i in range(len(corpus))] + ["last"]
        )
    assert pipeline.bridge.running() and pipeline.ingest.running()
    # Only the unknown device's message is a dead letter: a known device's belong to its tenant.
    dead = wait_for(lambda: read_deadletters(pipeline.nats_url), what="the unknown device's dead letter")
    assert [subject for subject, _, _ in dead] == ["deadletter.unknown_device"]
    assert "retrying one by one" not in pipeline.ingest.log()


# --------------------------------------------------------------------------- schemathesis


@pytest.fixture
def api_schema(live_db: None, alpha: TenantPersona, http_nats: str) -> Any:
    from django.core.wsgi import get_wsgi_application

    app: WSGIHandler = get_wsgi_application()
    return schemathesis.openapi.from_wsgi("/api/schema/", app, headers={"Host": PUBLIC_HOST})


@pytest.fixture
def device_keys(live_db: None, alpha: TenantPersona) -> dict[str, str]:
    """An API key for a device of each processing mode (committed: the WSGI app reads them)."""
    with schema_context(alpha.schema):
        types = {
            ProcessingMode.ENDPOINT: make_device_type(message_schema={}),
            ProcessingMode.GATEWAY: make_device_type(
                processing_mode=ProcessingMode.GATEWAY, auto_register_children=True, message_schema={}
            ),
            # At the platform's limit, which the schema documents (a type may set a lower one).
            ProcessingMode.GATEWAY_CHUNKED: make_device_type(
                processing_mode=ProcessingMode.GATEWAY_CHUNKED,
                auto_register_children=True,
                message_schema={},
                max_chunks=10000,
            ),
        }
        devices = {mode: make_device(t) for mode, t in types.items()}
    return {mode: api_key_create(logical_id=d.logical_identifier)[1] for mode, d in devices.items()}


def mode_of(body: Any) -> str:
    """The processing mode a body's shape belongs to: the device whose credential sends it."""
    if isinstance(body, dict) and "transaction_id" in body:
        return ProcessingMode.GATEWAY_CHUNKED
    if isinstance(body, dict) and "children" in body:
        return ProcessingMode.GATEWAY
    return ProcessingMode.ENDPOINT


# The ingestion endpoint, on the public host (the read API has its own contract test, on a
# tenant's host: tests/test_api_contract.py).
schema = schemathesis.pytest.from_fixture("api_schema").include(path="/api/v1/telemetry")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_it_agrees_with_its_openapi_schema(case: Any, device_keys: dict[str, str]) -> None:
    # A body of a shape is sent by a device of that shape's processing mode (the schema documents
    # the shapes of all three; a device accepts those of its own mode).
    body = case.body
    if case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE and isinstance(body, dict):
        # What JSON Schema cannot express: a chunk's index is below its total.
        assume(not isinstance(body.get("chunk"), int) or body["chunk"] < body.get("total", 0))
    headers = {"Host": PUBLIC_HOST}
    if case.path == "/api/v1/telemetry":
        headers["Authorization"] = f"Api-Key {device_keys[mode_of(case.body)]}"
    case.call_and_validate(headers=headers)
