"""Assets (with health and latest values) and their health history; alerts, acknowledged and
resolved through the same services as the admin's actions (assets/alerts.py)."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from drf_spectacular.utils import OpenApiExample, extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from argus.api import TenantAPI, TenantUsers, next_page_url, requires
from assets.alerts import AlertTransitionError, alert_acknowledge, alert_resolve
from assets.api.filters import AlertFilterSet, AssetFilterSet
from assets.api.serializers import AlertSerializer, AssetSerializer, HealthHistorySerializer, HealthQuerySerializer
from assets.models import Alert, Asset, AssetHealthScore
from assets.tasks import send_followups


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The object is not in a state that allows this."
    default_code = "conflict"


HEALTH_EXAMPLE = OpenApiExample(
    "Two changes of the score",
    value={
        "asset": 2,
        "start": "2026-12-03T08:00:00Z",
        "end": "2026-12-03T09:00:00Z",
        "scores": [
            {
                "time": "2026-12-03T08:10:00Z",
                "score": 80.0,
                "algorithm": "threshold",
                "version": 2,
                "explanation": {
                    "alerts": [
                        {
                            "alert": 7,
                            "rule": "Cold storage warming",
                            "metric": "temperature",
                            "severity": "warning",
                            "penalty": 20,
                        }
                    ],
                    "penalties": {"info": 5, "warning": 20, "critical": 50},
                },
            },
            {
                "time": "2026-12-03T08:20:00Z",
                "score": 100.0,
                "algorithm": "threshold",
                "version": 2,
                "explanation": {"alerts": [], "penalties": {"info": 5, "warning": 20, "critical": 50}},
            },
        ],
        "next": None,
    },
)


@extend_schema_view(
    list=extend_schema(summary="Assets with health and latest values", tags=["assets"]),
    retrieve=extend_schema(summary="One asset", tags=["assets"]),
    create=extend_schema(summary="Create an asset", tags=["assets"]),
    update=extend_schema(summary="Replace an asset's settings", tags=["assets"]),
    partial_update=extend_schema(summary="Change some of an asset's settings", tags=["assets"]),
)
class AssetViewSet(
    TenantAPI,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet[Asset],
):
    queryset = Asset.objects.select_related("asset_type")
    serializer_class = AssetSerializer
    filterset_class = AssetFilterSet
    ordering = "id"

    @extend_schema(
        summary="The history of an asset's health score",
        tags=["assets"],
        parameters=[HealthQuerySerializer],
        responses=HealthHistorySerializer,
        examples=[HEALTH_EXAMPLE],
    )
    @action(detail=True, methods=["get"])
    def health(self, request: Request, pk: str) -> Response:
        asset = self.get_object()
        query = HealthQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        q: dict[str, Any] = query.validated_data
        scores = AssetHealthScore.objects.filter(asset=asset, time__gte=q["start"], time__lt=q["end"])
        if q["after"] is not None:
            scores = scores.filter(time__gt=q["after"])
        page = list(scores.order_by("time", "id")[: q["limit"]])
        last = page[-1].time if len(page) == q["limit"] else None
        body = {
            "asset": asset.pk,
            "start": q["start"],
            "end": q["end"],
            "scores": page,
            "next": next_page_url(request, last, start=q["start"], end=q["end"]),
        }
        return Response(HealthHistorySerializer(body).data)


@extend_schema_view(
    list=extend_schema(summary="Alerts, newest first", tags=["alerts"]),
    retrieve=extend_schema(summary="One alert", tags=["alerts"]),
)
class AlertViewSet(TenantAPI, viewsets.ReadOnlyModelViewSet[Alert]):
    queryset = Alert.objects.select_related("rule", "asset", "device", "acknowledged_by", "resolved_by")
    serializer_class = AlertSerializer
    filterset_class = AlertFilterSet
    ordering = "-id"

    def _transition(self, request: Request, service: Any) -> Response:
        alert = self.get_object()
        try:
            with transaction.atomic():
                _alert, changes = service(alert_id=alert.pk, user=request.user)
                send_followups(changes, set())
        except AlertTransitionError as exc:
            raise Conflict(str(exc), "alert_state") from exc
        return Response(self.get_serializer(self.get_queryset().get(pk=alert.pk)).data)

    @extend_schema(summary="Acknowledge an open alert", tags=["alerts"], request=None, responses=AlertSerializer)
    @action(detail=True, methods=["post"], permission_classes=[TenantUsers, requires("assets.change_alert")])
    def acknowledge(self, request: Request, pk: str) -> Response:
        return self._transition(request, alert_acknowledge)

    @extend_schema(summary="Resolve an alert by hand", tags=["alerts"], request=None, responses=AlertSerializer)
    @action(detail=True, methods=["post"], permission_classes=[TenantUsers, requires("assets.change_alert")])
    def resolve(self, request: Request, pk: str) -> Response:
        return self._transition(request, alert_resolve)
