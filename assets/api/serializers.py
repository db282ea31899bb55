"""Wire shapes of assets (with health and latest values), health history and alerts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from argus.api import ModelCleaned, SlugRelation, bounded_json, time_of_cursor
from assets.models import Alert, Asset, AssetHealthScore, AssetType
from assets.selectors import AssetView, asset_views


class HealthSerializer(serializers.Serializer[Any]):
    score = serializers.FloatField(allow_null=True, help_text="0-100; null until first scored.")
    computed_by = serializers.CharField(help_text="<algorithm>@<version>")
    updated_at = serializers.DateTimeField(allow_null=True)
    explanation = serializers.JSONField(help_text="Each metric's value, sub-score and weight; or the alerts.")


class AssetValueSerializer(serializers.Serializer[Any]):
    value = serializers.FloatField(help_text="Transformed by the asset type (its units).")
    time = serializers.DateTimeField(help_text="Device time.")
    device = serializers.CharField(help_text="Logical id of the device it came from.")


class AssetListSerializer(serializers.ListSerializer[Asset]):
    """A page of assets: their devices and latest values read for the whole page at once."""

    def to_representation(self, data: Any) -> list[Any]:
        assets = list(data.all() if hasattr(data, "all") else data)
        self.child.context["asset_views"] = asset_views([asset.pk for asset in assets])  # type: ignore[union-attr]
        return [self.child.to_representation(asset) for asset in assets]  # type: ignore[union-attr]


class AssetSerializer(ModelCleaned):
    """An asset, its type by name; health and latest values read-only."""

    type = SlugRelation(source="asset_type", slug_field="name", queryset=AssetType.objects.all())
    metadata = serializers.JSONField(required=False, validators=[bounded_json])
    health = serializers.SerializerMethodField()
    devices = serializers.SerializerMethodField()
    latest = serializers.SerializerMethodField()

    class Meta:
        model = Asset
        fields = [
            "id",
            "name",
            "type",
            "location",
            "metadata",
            "health",
            "devices",
            "latest",
            "last_telemetry_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["last_telemetry_at", "created_at", "updated_at"]
        list_serializer_class = AssetListSerializer

    def _view(self, asset: Asset) -> AssetView:
        views: dict[int, AssetView] | None = self.context.get("asset_views")
        if views is None or asset.pk not in views:
            views = asset_views([asset.pk])
            self.context["asset_views"] = views
        return views[asset.pk]

    @staticmethod
    @extend_schema_field(HealthSerializer)
    def get_health(asset: Asset) -> dict[str, Any]:
        score = asset.health_score
        return HealthSerializer(
            {
                "score": float(score) if score is not None else None,
                "computed_by": asset.health_score_computed_by,
                "updated_at": asset.health_score_updated_at,
                "explanation": asset.health_explanation,
            }
        ).data

    @extend_schema_field(serializers.ListField(child=serializers.CharField(), help_text="Logical ids."))
    def get_devices(self, asset: Asset) -> list[str]:
        return self._view(asset).devices

    @extend_schema_field(serializers.DictField(child=AssetValueSerializer(), help_text="Asset metric -> newest."))
    def get_latest(self, asset: Asset) -> dict[str, Any]:
        view = self._view(asset)
        return {
            metric: AssetValueSerializer(
                {"value": r.value, "time": r.time, "device": view.device_names.get(r.device_id, "")}
            ).data
            for metric, r in sorted(view.latest.items())
        }


class HealthScoreSerializer(serializers.ModelSerializer[AssetHealthScore]):
    score = serializers.FloatField()

    class Meta:
        model = AssetHealthScore
        fields = ["time", "score", "algorithm", "version", "explanation"]


class HealthHistorySerializer(serializers.Serializer[Any]):
    asset = serializers.IntegerField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    scores = HealthScoreSerializer(many=True, help_text="Oldest first: every change of the score.")
    next = serializers.URLField(allow_null=True, help_text="The next page, or null after the last.")


class HealthQuerySerializer(serializers.Serializer[Any]):
    start = serializers.DateTimeField(required=False, help_text="Inclusive; default: 24 h before `end`.")
    end = serializers.DateTimeField(required=False, help_text="Exclusive; default: now.")
    limit = serializers.IntegerField(required=False, min_value=1, help_text="Scores per page.")
    cursor = serializers.CharField(required=False, max_length=64, help_text="From `next` of the previous page.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        end = attrs.get("end") or timezone.now()
        start = attrs.get("start") or end - timedelta(days=1)
        if start >= end:
            raise serializers.ValidationError({"start": "Must be before end."})
        if (end - start).total_seconds() > settings.ARGUS_API_HEALTH_MAX_SECONDS:
            raise serializers.ValidationError({"start": f"At most {settings.ARGUS_API_HEALTH_MAX_SECONDS} s."})
        limit = min(attrs.get("limit") or settings.ARGUS_API_MAX_POINTS, settings.ARGUS_API_MAX_POINTS)
        after = time_of_cursor(attrs["cursor"]) if "cursor" in attrs else None
        return {"start": start, "end": end, "limit": limit, "after": after}


class RuleRefSerializer(serializers.Serializer[Any]):
    id = serializers.IntegerField()
    name = serializers.CharField()
    condition = serializers.CharField(help_text="The rule in words, e.g. 'temperature greater than -18 for 10 s'.")


class AlertSerializer(serializers.ModelSerializer[Alert]):
    rule = serializers.SerializerMethodField()
    asset_name = serializers.CharField(source="asset.name", read_only=True)
    device: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="logical_identifier", read_only=True
    )
    acknowledged_by: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username", read_only=True
    )
    resolved_by: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = Alert
        fields = [
            "id",
            "status",
            "severity",
            "rule",
            "asset",
            "asset_name",
            "device",
            "metric",
            "value",
            "last_value",
            "message",
            "condition_since",
            "raised_at",
            "acknowledged_at",
            "acknowledged_by",
            "resolved_at",
            "resolved_by",
            "resolution",
        ]
        read_only_fields = fields

    @staticmethod
    @extend_schema_field(RuleRefSerializer)
    def get_rule(alert: Alert) -> dict[str, Any]:
        return {"id": alert.rule_id, "name": alert.rule.name, "condition": alert.rule.describe()}
