"""Admin for asset types, assets, threshold rules, alerts (acknowledge and resolve as actions) and
webhooks with their deliveries."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from argus.admin import TenantOnlyAdmin
from assets.alerts import AlertTransitionError, alert_acknowledge, alert_resolve
from assets.models import (
    Alert,
    AlertStatus,
    Asset,
    AssetDevice,
    AssetHealthScore,
    AssetType,
    ThresholdRule,
    WebhookDelivery,
    WebhookEndpoint,
)
from assets.tasks import send_followups


@admin.register(AssetType)
class AssetTypeAdmin(TenantOnlyAdmin):
    list_display = ("name", "category", "health_algorithm", "transformation_engine", "updated_at")
    list_filter = ("category", "health_algorithm")
    search_fields = ("name",)
    fieldsets = (
        (None, {"fields": ("name", "category", "description")}),
        ("Metrics", {"fields": ("metric_definitions",)}),
        ("Transformation", {"fields": ("transformation_engine", "transformation_config")}),
        ("Health", {"fields": ("health_algorithm", "health_parameters")}),
    )


class AssetDeviceInline(admin.TabularInline[AssetDevice, Asset]):
    model = AssetDevice
    extra = 0
    raw_id_fields = ("device",)


class NewestRowsInline(admin.TabularInline[Any, Any]):
    """A read-only inline of a growing history that shows only its newest rows (the whole of it
    is a list page or the read API away)."""

    newest = 20
    parent_field = ""
    time_field = ""
    extra = 0
    max_num = 0
    can_delete = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        queryset = super().get_queryset(request)
        parent_id = request.resolver_match.kwargs.get("object_id") if request.resolver_match else None
        ids = queryset.filter(**{self.parent_field: parent_id}).order_by(f"-{self.time_field}")
        return queryset.filter(pk__in=list(ids.values_list("pk", flat=True)[: self.newest]))


class AssetHealthScoreInline(NewestRowsInline):
    model = AssetHealthScore
    parent_field = "asset_id"
    time_field = "time"
    fields = ("time", "score", "algorithm", "version", "explanation")
    readonly_fields = fields
    ordering = ("-time",)
    verbose_name_plural = "Health history (newest 20)"


@admin.register(Asset)
class AssetAdmin(TenantOnlyAdmin):
    list_display = ("name", "asset_type", "health_score", "health_score_updated_at", "last_telemetry_at")
    list_filter = ("asset_type",)
    search_fields = ("name", "location")
    list_select_related = ("asset_type",)
    readonly_fields = (
        "health_score",
        "health_score_updated_at",
        "health_score_computed_by",
        "health_explanation",
        "last_telemetry_at",
    )
    inlines = [AssetDeviceInline, AssetHealthScoreInline]


@admin.register(ThresholdRule)
class ThresholdRuleAdmin(TenantOnlyAdmin):
    list_display = ("name", "asset_type", "asset", "metric", "operator", "threshold", "severity", "enabled")
    list_filter = ("severity", "enabled", "asset_type")
    search_fields = ("name", "metric")
    list_select_related = ("asset_type", "asset")
    fieldsets = (
        (None, {"fields": ("name", "enabled", "severity")}),
        ("Scope (an asset type, or one asset)", {"fields": ("asset_type", "asset")}),
        ("Condition", {"fields": ("metric", "operator", "threshold", "threshold_high", "hysteresis")}),
        ("Timing", {"fields": ("duration_seconds", "no_data_seconds")}),
    )


def _transition(request: HttpRequest, queryset: QuerySet[Alert], action: Any, done: str) -> None:
    count = 0
    for alert_id in queryset.values_list("pk", flat=True):
        try:
            with transaction.atomic():
                _alert, changes = action(alert_id=alert_id, user=request.user)
                send_followups(changes, set())
        except AlertTransitionError:
            continue
        count += 1
    messages.info(request, f"{count} alert(s) {done}.")


@admin.action(description="Acknowledge the selected alerts", permissions=["change"])
def acknowledge(modeladmin: AlertAdmin, request: HttpRequest, queryset: QuerySet[Alert]) -> None:
    _transition(request, queryset.filter(status=AlertStatus.OPEN), alert_acknowledge, "acknowledged")


@admin.action(description="Resolve the selected alerts", permissions=["change"])
def resolve(modeladmin: AlertAdmin, request: HttpRequest, queryset: QuerySet[Alert]) -> None:
    _transition(request, queryset.exclude(status=AlertStatus.RESOLVED), alert_resolve, "resolved")


@admin.register(Alert)
class AlertAdmin(TenantOnlyAdmin):
    list_display = ("raised_at", "severity", "status", "asset", "metric", "value", "rule", "acknowledged_by")
    list_filter = ("status", "severity")
    list_select_related = ("asset", "rule", "acknowledged_by")
    actions = [acknowledge, resolve]
    readonly_fields = (
        "rule",
        "asset",
        "device",
        "metric",
        "value",
        "last_value",
        "severity",
        "status",
        "message",
        "condition_since",
        "raised_at",
        "acknowledged_at",
        "acknowledged_by",
        "resolved_at",
        "resolved_by",
        "resolution",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # alerts are opened by rules


class WebhookDeliveryInline(NewestRowsInline):
    model = WebhookDelivery
    parent_field = "endpoint_id"
    time_field = "created_at"
    fields = ("created_at", "event", "alert", "status", "attempts", "response_status", "last_error", "delivered_at")
    readonly_fields = fields
    ordering = ("-created_at",)
    verbose_name_plural = "Deliveries (newest 20; all under Webhook deliveries)"


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(TenantOnlyAdmin):
    list_display = ("name", "url", "enabled", "created_at")
    list_filter = ("enabled",)
    search_fields = ("name", "url")
    inlines = [WebhookDeliveryInline]


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(TenantOnlyAdmin):
    list_display = ("created_at", "endpoint", "event", "status", "attempts", "response_status", "next_attempt_at")
    list_filter = ("status", "event")
    list_select_related = ("endpoint",)
    readonly_fields = (
        "endpoint",
        "alert",
        "event",
        "payload",
        "status",
        "attempts",
        "next_attempt_at",
        "last_attempt_at",
        "response_status",
        "last_error",
        "delivered_at",
        "created_at",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
