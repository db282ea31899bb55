"""POST /api/v1/telemetry: a device sends one message; 202 once JetStream has acknowledged it.

The body is checked only as far as can be done cheaply (the device type's adapter and JSON
Schema), so a device learns of a bad message at once; storing happens in `runingest`. The exact
bytes received are published, never a re-serialisation.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any

import nats.errors
from django.conf import settings
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiRequest, OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.parsers import JSONParser
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from argus.problems import PROBLEM_CONTENT_TYPE, PayloadTooLarge, ServiceUnavailable
from argus.registry import in_schema
from devices.authentication import (
    API_KEY_KEYWORD,
    BEARER_KEYWORD,
    REALM,
    DeviceAPIKeyAuthentication,
    DeviceIdentity,
    DeviceJWTAuthentication,
    IsDevice,
)
from devices.models import DeviceType, ProcessingMode
from telemetry.adapters import ADAPTERS, Decoded, Rejected
from telemetry.api.serializers import TELEMETRY_REQUEST_SCHEMA, AcceptedSerializer, ProblemSerializer
from telemetry.api.throttling import DeviceRateThrottle
from telemetry.jetstream import H_MSG_ID, SyncPublisher, from_epoch_ms, now_ms, telemetry_headers, telemetry_subject
from telemetry.profiles import TypeProfile, type_profile_of

log = logging.getLogger(__name__)

_publisher: SyncPublisher | None = None
_publisher_lock = threading.Lock()


def publisher() -> SyncPublisher:
    """The process's JetStream publisher, connected on first use to settings.NATS_URL."""
    global _publisher
    with _publisher_lock:
        old = _publisher
        if old is not None and old.url == settings.NATS_URL:
            return old
        _publisher = current = SyncPublisher(settings.NATS_URL)
    if old is not None:
        old.close()
    return current


def reset_publisher() -> None:
    """Close and forget the publisher, so the next request connects afresh (tests point it elsewhere)."""
    global _publisher
    with _publisher_lock:
        old, _publisher = _publisher, None
    if old is not None:
        old.close()


class InvalidMessage(exceptions.APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_detail = "The message is not valid for this device."
    default_code = "invalid_message"


def _problem(description: str) -> OpenApiResponse:
    return OpenApiResponse(ProblemSerializer, description=description)


_EXAMPLES = [
    OpenApiExample(
        "Endpoint: one reading",
        value={"msg_id": "a1", "ts": 1769594400000, "values": {"temperature": 21.5, "humidity": 40.2}},
        request_only=True,
    ),
    OpenApiExample(
        "Endpoint: several readings",
        value=[
            {"ts": 1769594400000, "values": {"temperature": 21.5}},
            {"ts": 1769594460000, "values": {"temperature": 21.7}},
        ],
        request_only=True,
    ),
    OpenApiExample(
        "Gateway: child readings",
        value={
            "msg_id": "g1",
            "ts": 1769594400000,
            "children": [
                {"id": "BEACON-0001", "values": {"rssi": -61, "battery": 88}},
                {"id": "BEACON-0002", "ts": 1769594399000, "values": {"rssi": -70, "battery": 91}},
            ],
        },
        request_only=True,
    ),
    OpenApiExample(
        "Chunked gateway: one chunk",
        value={
            "transaction_id": "7f9c2a",
            "chunk": 0,
            "total": 2,
            "ts": 1769594400000,
            "children": [{"id": "BEACON-0001", "values": {"rssi": -61}}],
        },
        request_only=True,
    ),
]

_RETRY_AFTER = OpenApiParameter(
    "Retry-After",
    OpenApiTypes.INT,
    location=OpenApiParameter.HEADER,
    description="Seconds to wait before trying again.",
    response=[429, 503],
)


class _RequiredBodySchema(AutoSchema):
    """The body is a plain JSON Schema (no serializer), which drf-spectacular leaves optional:
    an empty body is a 400, so the schema says it is required."""

    def _get_request_body(self, direction: str = "request") -> dict[str, Any] | None:
        body: dict[str, Any] | None = super()._get_request_body(direction)
        if body:
            body["required"] = True
        return body


class TelemetryIngestView(APIView):
    """Accept one telemetry message from the authenticated device."""

    schema = _RequiredBodySchema()

    authentication_classes = [DeviceAPIKeyAuthentication, DeviceJWTAuthentication]
    permission_classes = [IsDevice]
    throttle_classes = [DeviceRateThrottle]
    # The raw body is read and published as is; the parser only documents the media type.
    parser_classes = [JSONParser]
    renderer_classes = [JSONRenderer]

    def get_authenticate_header(self, request: Request) -> str:
        # Both schemes are accepted, so a 401 offers both challenges.
        return f"{API_KEY_KEYWORD} {REALM}, {BEARER_KEYWORD} {REALM}"

    @extend_schema(
        operation_id="telemetry_ingest",
        summary="Send telemetry",
        description=(
            "Send one message as the device named by the credential (never by the body). The body is any of "
            "the message shapes of the device's processing mode. 202 means the message is durably queued "
            "(JetStream acknowledged it); it is stored moments later. Errors are application/problem+json."
        ),
        tags=["telemetry"],
        request={"application/json": OpenApiRequest(TELEMETRY_REQUEST_SCHEMA, examples=_EXAMPLES)},
        parameters=[_RETRY_AFTER],
        responses={
            (202, "application/json"): OpenApiResponse(AcceptedSerializer, description="Queued for storage."),
            (400, PROBLEM_CONTENT_TYPE): _problem("Malformed JSON, or a message the device type refuses."),
            (401, PROBLEM_CONTENT_TYPE): _problem("Missing or invalid credential."),
            (403, PROBLEM_CONTENT_TYPE): _problem("Valid credential, not allowed (revoked key, disabled device)."),
            (413, PROBLEM_CONTENT_TYPE): _problem("Body larger than the platform's maximum payload."),
            (429, PROBLEM_CONTENT_TYPE): _problem("Rate limit of this device reached; see Retry-After."),
            (503, PROBLEM_CONTENT_TYPE): _problem("Pipeline unavailable; nothing was accepted. See Retry-After."),
        },
    )
    def post(self, request: Request) -> Response:
        identity = request.user
        assert isinstance(identity, DeviceIdentity)  # IsDevice let the request through
        body = self._body(request)
        received_ms = now_ms()
        profile = self._type_profile(identity)
        decoded = self._check(body, profile, from_epoch_ms(received_ms))
        headers = telemetry_headers(logical_id=identity.logical_id, received_ms=received_ms, transport="http")
        subject = telemetry_subject(identity.schema, identity.device_id)
        try:
            publisher().publish(subject, body, headers, timeout=settings.ARGUS_HTTP_PUBLISH_TIMEOUT_SECONDS)
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            log.warning("publish failed device=%s subject=%s: %r", identity.logical_id, subject, exc)
            raise ServiceUnavailable(
                "The telemetry pipeline is unavailable; the message was not accepted.",
                code="pipeline_unavailable",
                wait=settings.ARGUS_HTTP_RETRY_AFTER_SECONDS,
            ) from exc
        return Response(
            {"accepted": len(decoded.readings), "message_id": headers[H_MSG_ID]}, status=status.HTTP_202_ACCEPTED
        )

    @staticmethod
    def _body(request: Request) -> bytes:
        limit = settings.ARGUS_MAX_PAYLOAD_BYTES
        too_large = PayloadTooLarge(f"The body must be at most {limit} bytes.")
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise exceptions.ParseError("Invalid Content-Length.") from None
        if declared > limit:
            raise too_large
        body: bytes = request._request.body
        if len(body) > limit:
            raise too_large
        return body

    @staticmethod
    def _type_profile(identity: DeviceIdentity) -> TypeProfile:
        # Read from the database, not a cache: a type edited in the admin must apply to the very
        # next request. The authentication read it with the device row; otherwise it is read here.
        device_type = identity.device_type
        if device_type is None:
            with in_schema(identity.schema):
                device_type = DeviceType.objects.filter(pk=identity.device_type_id).first()
        if device_type is None:
            raise exceptions.PermissionDenied("The device's type no longer exists.")
        return type_profile_of(device_type)

    @staticmethod
    def _check(body: bytes, profile: TypeProfile, received_at: datetime) -> Decoded:
        adapter = ADAPTERS.get(profile.protocol_adapter)
        if adapter is None:
            log.error("device type %s names unknown adapter %r", profile.name, profile.protocol_adapter)
            raise InvalidMessage(f"The device type's protocol adapter {profile.protocol_adapter!r} is unknown.")
        try:
            decoded = adapter(body, profile.processing_mode, received_at, profile.max_children)
            if decoded.chunk is not None:
                # Ingest parses a chunk's children only at reassembly; a device posting over HTTP
                # hears about a bad child now. The type's schema applies to the reassembled whole.
                adapter(body, ProcessingMode.GATEWAY, received_at, profile.max_children)
        except Rejected as exc:
            code = (
                "malformed_json" if exc.reason.startswith(("malformed JSON", "payload is not")) else "invalid_message"
            )
            raise InvalidMessage(exc.reason, code=code) from None
        if decoded.chunk is not None:
            if decoded.chunk.total > profile.max_chunks:
                raise InvalidMessage(
                    f"total {decoded.chunk.total} exceeds the type's limit of {profile.max_chunks} chunks"
                )
            return decoded
        error = profile.schema_error(decoded.document)
        if error is not None:
            raise InvalidMessage(error, code="schema_violation")
        return decoded
