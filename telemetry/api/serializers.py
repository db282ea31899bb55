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


# PostgreSQL text cannot hold U+0000: strings that reach a column must not contain it.
_NO_NUL = "^[^\\x00]*$"
_VALUES = {
    "type": "object",
    "additionalProperties": {"type": "number"},
    "propertyNames": {"maxLength": 64, "pattern": _NO_NUL},
    "minProperties": 1,
}
_MSG_ID = {
    "oneOf": [
        {"type": "string", "minLength": 1, "maxLength": 200, "pattern": _NO_NUL},
        {"type": "integer", "minimum": -(2**53), "maximum": 2**53},
        {"type": "null"},
    ],
    "description": "Makes the message idempotent: stored once per device however often it is sent.",
}
# A child id becomes a device's logical identifier (devices.models.logical_identifier_validator).
_CHILD_ID = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$", "maxLength": 128}
_TS = {
    "oneOf": [
        {
            "type": "number",
            "description": "epoch milliseconds (a fraction is kept), years 1 to 9999",
            "minimum": -62135596800000,
            "maximum": 253402300799999,
        },
        {"type": "string", "format": "date-time"},
        # Devices send null for "no time" as often as they leave the field out; both mean the same.
        {"type": "null"},
    ],
    "description": "Reading time; the receive time when absent or null.",
}
_READING = {
    "type": "object",
    "required": ["values"],
    "properties": {"msg_id": _MSG_ID, "ts": _TS, "values": _VALUES},
}
# In a list, readings carry no msg_id of their own (a list has none: send one reading per message
# to make each idempotent).
_LISTED_READING = {"type": "object", "required": ["values"], "properties": {"ts": _TS, "values": _VALUES}}
_CHILDREN = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["id", "values"],
        "properties": {"id": _CHILD_ID, "ts": _TS, "values": _VALUES},
    },
}
_GATEWAY = {
    "type": "object",
    "required": ["children"],
    "properties": {"msg_id": _MSG_ID, "ts": _TS, "children": _CHILDREN},
}
_CHUNK = {
    "type": "object",
    "required": ["transaction_id", "chunk", "total", "children"],
    "properties": {
        "transaction_id": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": _NO_NUL},
        # Below `total` (which JSON Schema cannot say); `total` at most the device type's
        # max_chunks, itself at most 10,000.
        "chunk": {"type": "integer", "minimum": 0, "maximum": 9999},
        "total": {"type": "integer", "minimum": 1, "maximum": 10000},
        "msg_id": _MSG_ID,
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
        {"title": "Endpoint readings", "type": "array", "minItems": 1, "items": _LISTED_READING},
        {"title": "Gateway message", **_GATEWAY},
        {"title": "Chunk of a gateway message", **_CHUNK},
    ],
}
