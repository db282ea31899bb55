"""Admin for asset types, assets, threshold rules and alerts."""

from __future__ import annotations

from django.contrib import admin

from argus.admin import TenantOnlyAdmin
from assets.models import Alert, Asset, AssetDevice, AssetType, ThresholdRule


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


@admin.register(Asset)
class AssetAdmin(TenantOnlyAdmin):
    list_display = ("name", "asset_type", "health_score", "health_score_updated_at", "last_telemetry_at")
    list_filter = ("asset_type",)
    search_fields = ("name", "location")
    list_select_related = ("asset_type",)
    readonly_fields = ("health_score", "health_score_updated_at", "health_score_computed_by", "last_telemetry_at")
    inlines = [AssetDeviceInline]


@admin.register(ThresholdRule)
class ThresholdRuleAdmin(TenantOnlyAdmin):
    list_display = ("name", "asset_type", "asset", "metric", "operator", "threshold", "severity", "enabled")
    list_filter = ("severity", "enabled", "asset_type")
    search_fields = ("name", "metric")
    list_select_related = ("asset_type", "asset")


@admin.register(Alert)
class AlertAdmin(TenantOnlyAdmin):
    list_display = ("raised_at", "severity", "status", "asset", "metric", "value", "rule")
    list_filter = ("status", "severity")
    list_select_related = ("asset", "rule")
    readonly_fields = ("rule", "asset", "device", "metric", "value", "severity", "message", "raised_at")
