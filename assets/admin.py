"""Admin for asset types, assets, threshold rules, alerts (acknowledge and resolve as actions) and
webhooks with their deliveries."""

from __future__ import annotations

from typing import Any

import orjson
from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from import_export import fields, resources
from import_export.admin import ImportMixin
from import_export.formats import base_formats
from import_export.forms import ImportForm
from import_export.results import Result, RowResult

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
from assets.provisioning import COLUMNS, ProvisionFileError, check_row_count, devices_provision
from assets.tasks import send_followups
from devices.admin import DeviceAdmin
from devices.models import Device
from telemetry.selectors import latest_readings, metrics_of_device


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


# --------------------------------------------------------------------------- bulk provisioning


class DeviceProvisionResource(resources.Resource):
    """The device admin's import: the rows go through assets/provisioning.py, exactly as with
    `manage.py provision`; django-import-export shows the dry run's report and asks to confirm."""

    # The columns the import page lists (values are read by the provisioning service, not here).
    logical_identifier, name, device_type, parent, metadata, assets = (fields.Field(column_name=c) for c in COLUMNS)

    @classmethod
    def get_display_name(cls) -> str:
        return "Devices (provisioning)"

    def import_data(self, dataset: Any, dry_run: bool = False, **kwargs: Any) -> Result:
        result = Result()
        result.diff_headers = list(COLUMNS)
        rows = [dict(row) for row in dataset.dict]
        try:
            check_row_count(rows, headers=dataset.headers or [])
        except ProvisionFileError as exc:
            result.append_invalid_row(0, {}, ValidationError(str(exc)))
            return result
        # The admin confirms only a file without refusals, so its import is all or nothing.
        report = devices_provision(rows=rows, all_or_nothing=True, dry_run=dry_run)
        result.total_rows = len(rows)
        for outcome, row in zip(report.outcomes, rows, strict=True):
            if outcome.action == "refused":
                result.append_invalid_row(outcome.row, row, ValidationError(outcome.errors))
                result.totals[RowResult.IMPORT_TYPE_INVALID] += 1
                continue
            row_result = RowResult()
            row_result.import_type = {
                "created": RowResult.IMPORT_TYPE_NEW,
                "updated": RowResult.IMPORT_TYPE_UPDATE,
            }.get(outcome.action, RowResult.IMPORT_TYPE_SKIP)
            row_result.diff = [_shown(row.get(column)) for column in COLUMNS]
            if report.written and outcome.device is not None:
                row_result.instance = outcome.device
                row_result.add_instance_info(outcome.device)
            result.append_row_result(row_result)
            result.increment_row_result_total(row_result)
        return result


def _shown(value: Any) -> str:
    # The template escapes it; lists and objects (a JSON file's) shown as compact JSON.
    if value is None:
        return ""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


class ProvisionImportForm(ImportForm):
    def clean_import_file(self) -> Any:
        upload = self.cleaned_data["import_file"]
        if upload.size > settings.ARGUS_PROVISION_MAX_BYTES:
            raise forms.ValidationError(f"At most {settings.ARGUS_PROVISION_MAX_BYTES} bytes per file.")
        return upload


# The device admin gains the import here, where devices and the assets they feed are both known.
admin.site.unregister(Device)


@admin.register(Device)
class FleetDeviceAdmin(ImportMixin, DeviceAdmin):
    """The device admin with what this layer knows: the import and the latest readings."""

    resource_classes = [DeviceProvisionResource]
    import_form_class = ProvisionImportForm
    formats = [base_formats.CSV, base_formats.JSON]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        return (*super().get_readonly_fields(request, obj), "latest_readings")

    @admin.display(description="latest readings")
    def latest_readings(self, obj: Device) -> str:
        """Each metric's newest stored reading, by device time."""
        if obj.pk is None:
            return "-"
        newest = latest_readings({obj.pk: metrics_of_device(obj.pk)}).get(obj.pk, {})
        if not newest:
            return "No readings stored."
        cells = ((metric, value, time.isoformat()) for metric, (time, value) in sorted(newest.items()))
        rows = format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", cells)
        return format_html("<table><tr><th>metric</th><th>value</th><th>device time</th></tr>{}</table>", rows)
