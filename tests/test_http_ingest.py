"""HTTP ingestion (docs/ingestion.md): API keys, device JWTs, problem responses, publishing to JetStream.

Real PostgreSQL, Redis and a private nats-server per module (another one for the outage test),
so what the endpoint published can be read back and NATS can be stopped.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import nats
import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django_redis import get_redis_connection
from django_tenants.utils import schema_context
from nats.js.api import RawStreamMsg
from pytest_django.fixtures import SettingsWrapper

from argus.cache import database_identity
from argus.registry import use_public_schema
from devices import pki
from devices.models import Device, DeviceCertificate, DeviceStatus, DeviceType
from devices.services import api_key_create, api_key_revoke, certificate_issue, certificate_revoke
from devtools.services import ServerHandle, free_port, start_nats
from telemetry.api.views import reset_publisher
from telemetry.jetstream import H_DEVICE, H_MSG_ID, H_RECEIVED, H_TRANSPORT, TELEMETRY_STREAM
from tests.conftest import TenantPersona, make_device, make_device_type, unique_id

URL = "/api/v1/telemetry"
PROBLEM = "application/problem+json"
# No tenant has this host: the public site answers, and the credential alone routes the request.
PUBLIC_HOST = "ingest.example"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def pipeline(nats_server: ServerHandle, settings: SettingsWrapper) -> Iterator[str]:
    """The endpoint publishes to the private NATS."""
    settings.NATS_URL = nats_server.url
    reset_publisher()
    yield nats_server.url
    reset_publisher()


@pytest.fixture
def device(in_alpha: TenantPersona) -> Device:
    return make_device(
        make_device_type(
            message_schema={
                "type": "object",
                "properties": {
                    "values": {"type": "object", "properties": {"temperature": {"type": "number", "maximum": 100}}}
                },
            }
        )
    )


@pytest.fixture
def api_key(device: Device) -> str:
    return api_key_create(logical_id=device.logical_identifier)[1]


def post(body: bytes | str, authorization: str | None, host: str = PUBLIC_HOST) -> Any:
    # CSRF checks on, as for a browser: a device has no CSRF token and must not need one.
    client = Client(HTTP_HOST=host, enforce_csrf_checks=True)
    headers = {"Authorization": authorization} if authorization else {}
    data = body.encode() if isinstance(body, str) else body
    return client.generic("POST", URL, data, content_type="application/json", headers=headers)


def last_message(url: str, subject: str) -> RawStreamMsg:
    async def read() -> RawStreamMsg:
        nc = await nats.connect(url)
        try:
            return await nc.jetstream().get_last_msg(TELEMETRY_STREAM, subject)
        finally:
            await nc.close()

    return asyncio.run(read())


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == PROBLEM
    document: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail"} <= document.keys()
    assert document["status"] == status
    return document


def device_key_path(cert: DeviceCertificate, out: Path) -> Path:
    return out / pki.DEVICES_DIR / cert.subject_cn / f"{cert.serial_number}.key"


def token_for(cert: DeviceCertificate, out: Path, **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": cert.subject_cn, "aud": "argus", "iat": now, "exp": now + 300}
    claims.update(overrides)
    headers = {"kid": cert.fingerprint_sha256}
    return jwt.encode(claims, device_key_path(cert, out).read_bytes(), algorithm="ES256", headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest() if secret else b""
    return f"{signing_input}.{_b64(signature)}"


def valid_claims(logical_id: str) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": logical_id, "aud": "argus", "iat": now, "exp": now + 300}


# --------------------------------------------------------------------------- API keys


def test_it_publishes_the_exact_bytes_after_the_puback(pipeline: str, device: Device, api_key: str) -> None:
    body = b'{"values":  {"temperature": 21.5, "humidity": 40},\n "ts": 1769594400000}'
    before = time.time_ns() / 1_000_000
    response = post(body, f"Api-Key {api_key}")
    assert response.status_code == 202, response.content
    assert response.json()["accepted"] == 1
    message = last_message(pipeline, f"telemetry.alpha.{device.pk}")
    assert message.data == body
    assert message.headers is not None
    assert message.headers[H_MSG_ID] == response.json()["message_id"]
    assert message.headers[H_DEVICE] == device.logical_identifier
    assert message.headers[H_TRANSPORT] == "http"
    assert before <= float(message.headers[H_RECEIVED]) <= time.time_ns() / 1_000_000


def test_it_counts_the_readings_of_a_list(pipeline: str, in_alpha: TenantPersona) -> None:
    device = make_device(make_device_type(message_schema={}))
    api_key = api_key_create(logical_id=device.logical_identifier)[1]
    body = json.dumps([{"values": {"temperature": 1}}, {"values": {"temperature": 2}}, {"values": {"humidity": 3}}])
    response = post(body, f"Api-Key {api_key}")
    assert response.status_code == 202
    assert response.json()["accepted"] == 3


def test_it_stores_only_a_hash_of_the_key(device: Device) -> None:
    api_key, key = api_key_create(logical_id=device.logical_identifier, tenant_schema="alpha")
    secret = key.partition(".")[2]
    assert api_key.prefix == key.partition(".")[0]
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM public.device_api_keys")
        rows = cursor.fetchall()
    assert rows
    for row in rows:
        for value in row:
            assert secret not in str(value)
            assert key not in str(value)


def test_it_takes_the_device_from_the_key_never_from_the_body(
    pipeline: str, device: Device, api_key: str, beta: TenantPersona
) -> None:
    with schema_context(beta.schema):
        other = make_device(make_device_type())
    body = json.dumps(
        {"logical_identifier": other.logical_identifier, "device_id": other.pk, "values": {"temperature": 20}}
    )
    # Even sent to beta's own site, alpha's key writes alpha's device.
    response = post(body, f"Api-Key {api_key}", host=beta.host)
    assert response.status_code == 202
    message = last_message(pipeline, f"telemetry.alpha.{device.pk}")
    assert message.headers is not None
    assert message.headers[H_MSG_ID] == response.json()["message_id"]
    assert message.headers[H_DEVICE] == device.logical_identifier


def test_it_refuses_a_revoked_key(device: Device, api_key: str) -> None:
    assert api_key_revoke(logical_id=device.logical_identifier) == 1
    document = assert_problem(post('{"values": {"temperature": 1}}', f"Api-Key {api_key}"), 403)
    assert "revoked" in document["detail"]


def test_it_refuses_a_disabled_device(device: Device, api_key: str) -> None:
    Device.objects.filter(pk=device.pk).update(status=DeviceStatus.DISABLED)
    assert_problem(post('{"values": {"temperature": 1}}', f"Api-Key {api_key}"), 403)


def test_it_refuses_a_bad_key(device: Device, api_key: str) -> None:
    prefix = api_key.partition(".")[0]
    for bad in (f"{prefix}.{'x' * 32}", "nodot", "Zz9.nope"):
        response = post('{"values": {"temperature": 1}}', f"Api-Key {bad}")
        assert_problem(response, 401)
        assert "Api-Key" in response["WWW-Authenticate"]


def test_it_refuses_a_request_without_credentials(device: Device) -> None:
    response = post('{"values": {"temperature": 1}}', None)
    assert_problem(response, 401)
    assert "Api-Key" in response["WWW-Authenticate"]
    assert "Bearer" in response["WWW-Authenticate"]
    assert_problem(post('{"values": {"temperature": 1}}', "Basic dXNlcjpwdw=="), 401)


def test_it_prints_a_working_key_with_create_device_key(pipeline: str, device: Device) -> None:
    out = io.StringIO()
    call_command("create_device_key", device.logical_identifier, "--tenant", "alpha", stdout=out)
    printed = out.getvalue()
    match = re.search(r"^ {4}(\S+\.\S+)$", printed, re.MULTILINE)
    assert match, printed
    assert "curl" in printed
    response = post('{"values": {"temperature": 1}}', f"Api-Key {match.group(1)}")
    assert response.status_code == 202


def test_it_refuses_a_key_for_an_unknown_device(device: Device) -> None:
    with pytest.raises(CommandError):
        call_command("create_device_key", unique_id("NOPE"), stdout=io.StringIO())
    with pytest.raises(CommandError):
        call_command("create_device_key", device.logical_identifier, "--tenant", "beta", stdout=io.StringIO())


# --------------------------------------------------------------------------- JWT


def test_it_accepts_a_jwt_signed_with_the_device_certificate_key(pipeline: str, device: Device, pki_dir: Path) -> None:
    cert = certificate_issue(device=device, out_dir=pki_dir, days=30)
    response = post('{"values": {"temperature": 1}}', f"Bearer {token_for(cert, pki_dir)}")
    assert response.status_code == 202, response.content
    message = last_message(pipeline, f"telemetry.alpha.{device.pk}")
    assert message.headers is not None
    assert message.headers[H_MSG_ID] == response.json()["message_id"]


def test_it_accepts_either_certificate_during_rotation(pipeline: str, device: Device, pki_dir: Path) -> None:
    old = certificate_issue(device=device, out_dir=pki_dir, days=30)
    new = certificate_issue(device=device, out_dir=pki_dir, days=60)
    for cert in (old, new):
        assert post('{"values": {"temperature": 1}}', f"Bearer {token_for(cert, pki_dir)}").status_code == 202
        # Without kid, every current certificate is tried.
        key = device_key_path(cert, pki_dir).read_bytes()
        token = jwt.encode(valid_claims(device.logical_identifier), key, algorithm="ES256")
        assert post('{"values": {"temperature": 1}}', f"Bearer {token}").status_code == 202


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, "expired"),
        ({"aud": "someone-else"}, "audience"),
        ({"exp": int(time.time()) + 7200}, "lifetime"),
    ],
)
def test_it_refuses_a_jwt_with_bad_claims(
    device: Device, pki_dir: Path, overrides: dict[str, Any], reason: str
) -> None:
    cert = certificate_issue(device=device, out_dir=pki_dir, days=30)
    response = post('{"values": {"temperature": 1}}', f"Bearer {token_for(cert, pki_dir, **overrides)}")
    assert reason in assert_problem(response, 401)["detail"]
    assert "Bearer" in response["WWW-Authenticate"]


def test_it_refuses_a_jwt_for_an_unknown_subject(device: Device, pki_dir: Path) -> None:
    cert = certificate_issue(device=device, out_dir=pki_dir, days=30)
    token = token_for(cert, pki_dir, sub=unique_id("GHOST"))
    assert_problem(post('{"values": {"temperature": 1}}', f"Bearer {token}"), 401)


def test_it_refuses_a_jwt_naming_another_device(device: Device, pki_dir: Path) -> None:
    cert = certificate_issue(device=device, out_dir=pki_dir, days=30)
    other = make_device(device.device_type)
    token = token_for(cert, pki_dir, sub=other.logical_identifier)
    assert_problem(post('{"values": {"temperature": 1}}', f"Bearer {token}"), 401)


def test_it_refuses_alg_none(device: Device, pki_dir: Path) -> None:
    certificate_issue(device=device, out_dir=pki_dir, days=30)
    token = forged_token({"alg": "none", "typ": "JWT"}, valid_claims(device.logical_identifier), None)
    assert_problem(post('{"values": {"temperature": 1}}', f"Bearer {token}"), 401)


def test_it_refuses_hs256_signed_with_the_public_key(device: Device, pki_dir: Path) -> None:
    cert = certificate_issue(device=device, out_dir=pki_dir, days=30)
    public_pem = (
        pki.load_certificate(cert.pem)
        .public_key()
        .public_bytes(pki.serialization.Encoding.PEM, pki.serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for secret in (public_pem, cert.pem.encode()):
        token = forged_token({"alg": "HS256", "typ": "JWT"}, valid_claims(device.logical_identifier), secret)
        assert_problem(post('{"values": {"temperature": 1}}', f"Bearer {token}"), 401)


def test_it_refuses_a_jwt_of_a_revoked_certificate(device: Device, pki_dir: Path) -> None:
    cert = certificate_issue(device=device, out_dir=pki_dir, days=30)
    certificate_revoke(device=device, serial=cert.serial_number, reason="lost")
    response = post('{"values": {"temperature": 1}}', f"Bearer {token_for(cert, pki_dir)}")
    assert response.status_code in (401, 403)
    assert_problem(response, response.status_code)


def test_it_refuses_a_certificate_of_another_ca(device: Device, pki_dir: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign-ca"
    pki.init_ca(foreign, common_name="Not Argus")
    # Recorded for the device as if it were ours: the signature verifies, the issuer does not.
    cert = certificate_issue(device=device, out_dir=foreign, days=30)
    assert_problem(post('{"values": {"temperature": 1}}', f"Bearer {token_for(cert, foreign)}"), 401)


def test_it_refuses_a_jwt_signed_by_a_key_that_is_not_the_devices(device: Device, pki_dir: Path) -> None:
    certificate_issue(device=device, out_dir=pki_dir, days=30)
    # A certificate of the same name from another CA, never recorded: its key is not the device's.
    foreign = pki_dir.parent / "other"
    pki.init_ca(foreign)
    stranger = pki.issue_device(foreign, device.logical_identifier, days=30)
    token = jwt.encode(valid_claims(device.logical_identifier), stranger.key_path.read_bytes(), algorithm="ES256")
    assert_problem(post('{"values": {"temperature": 1}}', f"Bearer {token}"), 401)


def test_it_refuses_a_malformed_bearer_token(device: Device, pki_dir: Path) -> None:
    for token in ("not-a-jwt", "a.b.c", "Bearer two words"):
        assert_problem(post('{"values": {"temperature": 1}}', f"Bearer {token}"), 401)


# --------------------------------------------------------------------------- problems


def test_it_answers_400_for_malformed_json(device: Device, api_key: str) -> None:
    for body in (b'{"values": ', b"", b"\xff\xfe"):
        document = assert_problem(post(body, f"Api-Key {api_key}"), 400)
        assert document["type"].endswith("malformed_json")


def test_it_answers_400_with_the_reason_for_a_schema_violation(device: Device, api_key: str) -> None:
    document = assert_problem(post('{"values": {"temperature": 1000}}', f"Api-Key {api_key}"), 400)
    assert document["type"].endswith("schema_violation")
    assert "values/temperature" in document["detail"]
    assert "maximum" in document["detail"]
    shape = assert_problem(post('{"children": []}', f"Api-Key {api_key}"), 400)
    assert "values" in shape["detail"]


def test_it_answers_413_for_a_body_too_large(device: Device, api_key: str, settings: SettingsWrapper) -> None:
    settings.ARGUS_MAX_PAYLOAD_BYTES = 1024
    body = json.dumps({"values": {"temperature": 1}, "padding": "x" * 2000})
    assert_problem(post(body, f"Api-Key {api_key}"), 413)


def test_it_answers_429_after_the_devices_rate_limit(
    pipeline: str, device: Device, api_key: str, settings: SettingsWrapper
) -> None:
    settings.ARGUS_HTTP_RATE_LIMIT = "3/hour"
    for _ in range(3):
        assert post('{"values": {"temperature": 1}}', f"Api-Key {api_key}").status_code == 202
    response = post('{"values": {"temperature": 1}}', f"Api-Key {api_key}")
    assert_problem(response, 429)
    assert 0 < int(response["Retry-After"]) <= 3600
    # Another device has its own budget.
    with schema_context("alpha"):
        other = make_device(DeviceType.objects.get(pk=device.device_type_id))
    other_key = api_key_create(logical_id=other.logical_identifier)[1]
    assert post('{"values": {"temperature": 1}}', f"Api-Key {other_key}").status_code == 202
    # The budget is this database's: another database on the same Redis with a device of this
    # id counts under its own key.
    keys = get_redis_connection("default").keys(f"argus:ratelimit:*:device:{device.logical_identifier}:*")
    assert [k.decode().split(":")[2] for k in keys] == [database_identity()]


def test_it_answers_503_when_nats_is_down(device: Device, api_key: str, settings: SettingsWrapper) -> None:
    server = start_nats()
    try:
        settings.NATS_URL = server.url
        settings.ARGUS_HTTP_PUBLISH_TIMEOUT_SECONDS = 1.0
        reset_publisher()
        assert post('{"values": {"temperature": 1}}', f"Api-Key {api_key}").status_code == 202
        server.stop()
        response = post('{"values": {"temperature": 1}}', f"Api-Key {api_key}")
        assert_problem(response, 503)
        assert int(response["Retry-After"]) > 0
    finally:
        server.stop()
        reset_publisher()


def test_it_answers_503_quickly_while_nats_is_down_from_the_start_and_recovers(
    device: Device, api_key: str, settings: SettingsWrapper
) -> None:
    port = free_port()
    settings.NATS_URL = f"nats://127.0.0.1:{port}"
    settings.ARGUS_HTTP_PUBLISH_TIMEOUT_SECONDS = 1.0
    reset_publisher()
    server = None
    try:
        # Each request is bounded by the publish timeout; none waits for an earlier connect attempt.
        for _ in range(3):
            started = time.monotonic()
            response = post('{"values": {"temperature": 1}}', f"Api-Key {api_key}")
            elapsed = time.monotonic() - started
            assert_problem(response, 503)
            assert int(response["Retry-After"]) > 0
            assert elapsed < 2.5, f"503 took {elapsed:.1f}s"
        server = start_nats(port)
        started = time.monotonic()
        response = post('{"msg_id": "after-outage", "values": {"temperature": 2}}', f"Api-Key {api_key}")
        assert response.status_code == 202, response.content
        assert time.monotonic() - started < 2.5
        assert (
            last_message(server.url, f"telemetry.alpha.{device.pk}").data
            == b'{"msg_id": "after-outage", "values": {"temperature": 2}}'
        )
    finally:
        if server is not None:
            server.stop()
        reset_publisher()


def test_it_documents_the_endpoint_in_the_openapi_schema(db: None) -> None:
    response = Client(HTTP_HOST=PUBLIC_HOST).get("/api/schema/")
    assert response.status_code == 200
    schema = response.content.decode()
    assert "/api/v1/telemetry" in schema
    assert "deviceApiKey" in schema
    assert "deviceJwt" in schema


def test_it_lists_and_revokes_keys_in_the_platform_admin_without_showing_them(device: Device) -> None:
    api_key, key = api_key_create(logical_id=device.logical_identifier)
    use_public_schema()
    user = get_user_model()._default_manager.create_superuser(
        username="platform-keys", email="pk@example.com", password="pw-for-tests"
    )
    client = Client(HTTP_HOST=PUBLIC_HOST)
    client.force_login(user)
    listing = client.get("/admin/argus/deviceapikey/")
    assert listing.status_code == 200
    assert device.logical_identifier in listing.content.decode()
    assert key.partition(".")[2] not in listing.content.decode()
    response = client.post(
        "/admin/argus/deviceapikey/",
        {"action": "revoke_keys", "_selected_action": [api_key.pk]},
    )
    assert response.status_code == 302
    api_key.refresh_from_db()
    assert api_key.revoked
    assert_problem(post('{"values": {"temperature": 1}}', f"Api-Key {key}"), 403)
