"""Wire shapes of the ingestion API, for the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers


class AcceptedSerializer(serializers.Serializer[dict[str, Any]]):
    accepted = serializers.IntegerField(help_text="Readings in the message (for a gateway: child readings).")
    message_id = serializers.CharField(help_text="The pipeline's id of this message (JetStream Nats-Msg-Id).")


class ProblemSerializer(serializers.Serializer[dict[str, Any]]):
    type = serializers.CharField(help_text="A URI naming the kind of problem, e.g. urn:argus:problem:throttled.")
    title = serializers.CharField()
    status = serializers.IntegerField()
    detail = serializers.CharField(help_text="What went wrong with this request.")


_VALUES = {"type": "object", "additionalProperties": {"type": "number"}, "minProperties": 1}
_TS = {
    "oneOf": [
        {"type": "integer", "description": "epoch milliseconds"},
        {"type": "string", "format": "date-time"},
    ],
    "description": "Reading time; the receive time when absent.",
}
_READING = {
    "type": "object",
    "required": ["values"],
    "properties": {"msg_id": {"type": "string", "maxLength": 200}, "ts": _TS, "values": _VALUES},
}
_CHILDREN = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["id", "values"],
        "properties": {"id": {"type": "string"}, "ts": _TS, "values": _VALUES},
    },
}
_GATEWAY = {
    "type": "object",
    "required": ["children"],
    "properties": {"msg_id": {"type": "string", "maxLength": 200}, "ts": _TS, "children": _CHILDREN},
}
_CHUNK = {
    "type": "object",
    "required": ["transaction_id", "chunk", "total", "children"],
    "properties": {
        "transaction_id": {"type": "string", "maxLength": 128},
        "chunk": {"type": "integer", "minimum": 0},
        "total": {"type": "integer", "minimum": 1},
        "msg_id": {"type": "string", "maxLength": 200},
        "ts": _TS,
        "children": _CHILDREN,
    },
}

TELEMETRY_REQUEST_SCHEMA: dict[str, Any] = {
    "description": (
        "One of the shapes of the device's processing mode: endpoint (one reading or a list), gateway "
        "(readings of child devices) or a chunk of a chunked gateway message. The device type may add "
        "its own JSON Schema."
    ),
    # anyOf, not oneOf: a chunk is also a valid gateway message.
    "anyOf": [
        {"title": "Endpoint reading", **_READING},
        {"title": "Endpoint readings", "type": "array", "minItems": 1, "items": _READING},
        {"title": "Gateway message", **_GATEWAY},
        {"title": "Chunk of a gateway message", **_CHUNK},
    ],
}
