"""A device's readings in the read API: its newest value of each metric, and a metric's history
in buckets or raw points by cursor (telemetry/selectors.py owns the SQL). Routed under
`devices/{logical_id}/`, beside the device itself (devices/api/views.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from drf_spectacular.utils import OpenApiExample, PolymorphicProxySerializer, extend_schema
from rest_framework import viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from argus.api import TenantAPI, next_page_url
from devices.api.views import LOGICAL_ID_REGEX
from devices.models import Device
from telemetry.api.serializers import (
    BUCKETS,
    BucketsSerializer,
    HistoryQuerySerializer,
    LatestSerializer,
    PointsSerializer,
)
from telemetry.selectors import history_buckets, history_points, latest_readings, metrics_of_device

LATEST_EXAMPLE = OpenApiExample(
    "Latest values",
    value={
        "device": "TS-001-2024",
        "metrics": {
            "temperature": {"value": 21.5, "time": "2026-12-03T09:15:00Z"},
            "humidity": {"value": 44.0, "time": "2026-12-03T09:15:00Z"},
        },
    },
)
BUCKETS_EXAMPLE = OpenApiExample(
    "1-minute buckets",
    value={
        "device": "TS-001-2024",
        "metric": "temperature",
        "start": "2026-12-03T09:00:00Z",
        "end": "2026-12-03T09:02:00Z",
        "bucket": "1m",
        "buckets": [
            {"time": "2026-12-03T09:00:00Z", "avg": 21.4, "min": 21.2, "max": 21.6, "count": 6},
            {"time": "2026-12-03T09:01:00Z", "avg": 21.5, "min": 21.5, "max": 21.5, "count": 6},
        ],
    },
)
POINTS_EXAMPLE = OpenApiExample(
    "Raw points, one page of two",
    value={
        "device": "TS-001-2024",
        "metric": "temperature",
        "start": "2026-12-03T09:00:00Z",
        "end": "2026-12-03T10:00:00Z",
        "points": [
            {"value": 21.2, "time": "2026-12-03T09:00:04Z"},
            {"value": 21.3, "time": "2026-12-03T09:00:14Z"},
        ],
        "next": "https://acme.example.com/api/v1/devices/TS-001-2024/history/?metric=temperature&limit=2&cursor=MTc2NDc1MjQxNDAwMDAwMA",
    },
)


class DeviceReadingsViewSet(TenantAPI, viewsets.GenericViewSet[Device]):
    queryset = Device.objects.all()
    lookup_field = "logical_identifier"
    lookup_url_kwarg = "logical_id"
    lookup_value_regex = LOGICAL_ID_REGEX

    @extend_schema(
        summary="A device's newest value of each metric (by device time)",
        tags=["devices"],
        responses=LatestSerializer,
        examples=[LATEST_EXAMPLE],
    )
    @action(detail=True, methods=["get"])
    def latest(self, request: Request, logical_id: str) -> Response:
        device = self.get_object()
        readings = latest_readings({device.pk: metrics_of_device(device.pk)}).get(device.pk, {})
        metrics = {name: {"value": value, "time": time} for name, (time, value) in sorted(readings.items())}
        return Response(LatestSerializer({"device": device.logical_identifier, "metrics": metrics}).data)

    @extend_schema(
        summary="A metric's history: buckets, or raw points by cursor",
        tags=["devices"],
        parameters=[HistoryQuerySerializer],
        responses=PolymorphicProxySerializer(
            component_name="History",
            serializers=[BucketsSerializer, PointsSerializer],
            resource_type_field_name=None,
        ),
        examples=[BUCKETS_EXAMPLE, POINTS_EXAMPLE],
    )
    @action(detail=True, methods=["get"])
    def history(self, request: Request, logical_id: str) -> Response:
        device = self.get_object()
        query = HistoryQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        q: dict[str, Any] = query.validated_data
        base = {"device": device.logical_identifier, "metric": q["metric"], "start": q["start"], "end": q["end"]}
        if "bucket" in q:
            buckets = history_buckets(
                device_id=device.pk,
                metric=q["metric"],
                start=q["start"],
                end=q["end"],
                bucket=timedelta(seconds=BUCKETS[q["bucket"]]),
            )
            return Response(BucketsSerializer({**base, "bucket": q["bucket"], "buckets": buckets}).data)
        points = history_points(
            device_id=device.pk, metric=q["metric"], start=q["start"], end=q["end"], after=q["after"], limit=q["limit"]
        )
        last = points[-1].time if len(points) == q["limit"] else None
        following = next_page_url(request, last, start=q["start"], end=q["end"])
        return Response(PointsSerializer({**base, "points": points, "next": following}).data)
