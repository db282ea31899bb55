"""Admin for device types (profiles), devices and certificates."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from argus.admin import TenantOnlyAdmin
from argus.registry import current_schema
from devices.models import Device, DeviceCertificate, DeviceType, crl_renew_after_commit, presence_text
from devices.services import api_key_create, api_key_revoke, certificate_revoke


class OnlineFilter(admin.SimpleListFilter):
    title = "presence"
    parameter_name = "online"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("true", "online"), ("false", "offline"), ("unknown", "never said")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Device]) -> QuerySet[Device]:
        value = self.value()
        if value == "unknown":
            return queryset.filter(online__isnull=True)
        if value in ("true", "false"):
            return queryset.filter(online=value == "true")
        return queryset


class InactiveFilter(admin.SimpleListFilter):
    title = "inactive (silent for its type's intervals)"
    parameter_name = "inactive"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("true", "inactive"), ("false", "active")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Device]) -> QuerySet[Device]:
        if self.value() in ("true", "false"):
            return queryset.filter(**{"inactive": self.value() == "true"})  # annotated by get_queryset
        return queryset


@admin.register(DeviceType)
class DeviceTypeAdmin(TenantOnlyAdmin):
    list_display = (
        "name",
        "processing_mode",
        "protocol_adapter",
        "auto_register_children",
        "expected_interval_seconds",
        "error_feedback",
        "updated_at",
    )
    list_filter = ("processing_mode", "protocol_adapter")
    search_fields = ("name",)
    fieldsets = (
        (None, {"fields": ("name", "description", "processing_mode", "protocol_adapter")}),
        ("Messages", {"fields": ("message_schema", "metrics")}),
        ("Gateways", {"fields": ("auto_register_children", "child_device_type", "max_children")}),
        ("Chunked gateways", {"fields": ("chunk_ttl_seconds", "max_chunks")}),
        ("Presence and feedback", {"fields": ("expected_interval_seconds", "error_feedback")}),
    )


class CertificateInline(admin.TabularInline[DeviceCertificate, Device]):
    model = DeviceCertificate
    extra = 0
    can_delete = False
    fields = ("serial_number", "fingerprint_sha256", "not_before", "not_after", "revoked_at")
    readonly_fields = fields


@admin.register(Device)
class DeviceAdmin(TenantOnlyAdmin):
    list_display = ("logical_identifier", "name", "device_type", "device_role", "status", "presence", "last_seen")
    list_filter = (OnlineFilter, InactiveFilter, "device_type", "device_role", "status", "protocol")
    search_fields = ("logical_identifier", "name")
    list_select_related = ("device_type",)
    raw_id_fields = ("parent_device",)
    readonly_fields = ("presence", "last_seen", "created_at", "updated_at")
    inlines = [CertificateInline]
    actions = ["issue_api_keys", "revoke_api_keys", "revoke_certificates"]
    # Keys are shown on the page that issues them: at most this many devices at once.
    MAX_KEYS_AT_ONCE = 100

    def get_queryset(self, request: HttpRequest) -> QuerySet[Device]:
        return super().get_queryset(request).with_presence()  # type: ignore[attr-defined]

    @admin.display(description="presence", ordering="presence_since")
    def presence(self, obj: Device) -> str:
        """Online/offline since when (with the last disconnect reason), and inactive."""
        return presence_text(obj)

    @admin.action(description="Issue an HTTP API key for each (shown once)", permissions=["change"])
    def issue_api_keys(self, request: HttpRequest, queryset: QuerySet[Device]) -> HttpResponse | None:
        devices = list(queryset.order_by("logical_identifier")[: self.MAX_KEYS_AT_ONCE + 1])
        if len(devices) > self.MAX_KEYS_AT_ONCE:
            self.message_user(request, f"Select at most {self.MAX_KEYS_AT_ONCE} devices.", messages.ERROR)
            return None
        issued = []
        for device in devices:
            api_key, key = api_key_create(logical_id=device.logical_identifier, tenant_schema=current_schema())
            issued.append((device.logical_identifier, api_key.prefix, key))
        context = {**self.admin_site.each_context(request), "title": "API keys issued", "issued": issued}
        response = TemplateResponse(request, "admin/devices/device/api_keys.html", context)
        response["Cache-Control"] = "no-store"  # a key in the browser's cache would outlive the page
        return response

    @admin.action(description="Revoke the devices' API keys", permissions=["change"])
    def revoke_api_keys(self, request: HttpRequest, queryset: QuerySet[Device]) -> None:
        schema = current_schema()
        count = sum(api_key_revoke(logical_id=d.logical_identifier, tenant_schema=schema) for d in queryset)
        self.message_user(request, f"Revoked {count} API key(s).", messages.SUCCESS)

    @admin.action(description="Revoke the devices' certificates (the broker's CRL is rebuilt)", permissions=["change"])
    def revoke_certificates(self, request: HttpRequest, queryset: QuerySet[Device]) -> None:
        reason = f"revoked in the admin by {request.user}"[:64]
        with transaction.atomic():
            revoked = [c for device in queryset for c in certificate_revoke(device=device, reason=reason)]
            if revoked:
                crl_renew_after_commit()
        self.message_user(request, f"Revoked {len(revoked)} certificate(s).", messages.SUCCESS)
