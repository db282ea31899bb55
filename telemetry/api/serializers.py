"""Wire shapes of the ingestion API (for the OpenAPI schema) and of the read API's readings: a
device's latest values and its history."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone
from rest_framework import serializers

from argus.api import time_of_cursor


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


# --- The read API: readings ------------------------------------------------------------------

BUCKETS = {"1m": 60, "5m": 300, "1h": 3600, "1d": 86400}


class ReadingSerializer(serializers.Serializer[Any]):
    value = serializers.FloatField()
    time = serializers.DateTimeField(help_text="Device time of the reading.")


class LatestSerializer(serializers.Serializer[Any]):
    device = serializers.CharField(help_text="The device's logical id.")
    metrics = serializers.DictField(child=ReadingSerializer(), help_text="Metric -> its newest reading.")


class HistoryQuerySerializer(serializers.Serializer[Any]):
    """The query of a history request: one metric, a bounded range, buckets or raw points."""

    metric = serializers.CharField(max_length=64)
    start = serializers.DateTimeField(required=False, help_text="Inclusive; default: 24 h before `end`.")
    end = serializers.DateTimeField(required=False, help_text="Exclusive; default: now.")
    bucket = serializers.ChoiceField(
        choices=list(BUCKETS), required=False, help_text="Aggregate per bucket; absent: raw points, paginated."
    )
    limit = serializers.IntegerField(required=False, min_value=1, help_text="Raw points per page.")
    cursor = serializers.CharField(required=False, max_length=64, help_text="From `next` of the previous page.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        end = attrs.get("end") or timezone.now()
        start = attrs.get("start") or end - timedelta(days=1)
        if start >= end:
            raise serializers.ValidationError({"start": "Must be before end."})
        span = (end - start).total_seconds()
        bucket = attrs.get("bucket")
        if bucket is not None:
            most = BUCKETS[bucket] * settings.ARGUS_API_HISTORY_MAX_BUCKETS
            if span > most:
                raise serializers.ValidationError(
                    {"start": f"At most {settings.ARGUS_API_HISTORY_MAX_BUCKETS} buckets ({most} s at {bucket})."}
                )
        elif span > settings.ARGUS_API_HISTORY_RAW_MAX_SECONDS:
            raise serializers.ValidationError(
                {"start": f"Raw points: at most {settings.ARGUS_API_HISTORY_RAW_MAX_SECONDS} s; ask for buckets."}
            )
        limit = attrs.get("limit") or settings.ARGUS_API_MAX_POINTS
        after = time_of_cursor(attrs["cursor"]) if "cursor" in attrs else None
        return {**attrs, "start": start, "end": end, "limit": min(limit, settings.ARGUS_API_MAX_POINTS), "after": after}


class BucketSerializer(serializers.Serializer[Any]):
    time = serializers.DateTimeField(help_text="Start of the bucket (UTC).")
    avg = serializers.FloatField()
    min = serializers.FloatField()
    max = serializers.FloatField()
    count = serializers.IntegerField()


class BucketsSerializer(serializers.Serializer[Any]):
    device = serializers.CharField()
    metric = serializers.CharField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    bucket = serializers.CharField()
    buckets = BucketSerializer(many=True, help_text="Oldest first; buckets without readings are left out.")


class PointsSerializer(serializers.Serializer[Any]):
    device = serializers.CharField()
    metric = serializers.CharField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    points = ReadingSerializer(many=True, help_text="Oldest first.")
    next = serializers.URLField(allow_null=True, help_text="The next page, or null after the last.")
