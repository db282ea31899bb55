"""Admin for device types (profiles), devices and certificates."""

from __future__ import annotations

from django.contrib import admin

from argus.admin import TenantOnlyAdmin
from devices.models import Device, DeviceCertificate, DeviceType


@admin.register(DeviceType)
class DeviceTypeAdmin(TenantOnlyAdmin):
    list_display = ("name", "processing_mode", "protocol_adapter", "auto_register_children", "updated_at")
    list_filter = ("processing_mode", "protocol_adapter")
    search_fields = ("name",)
    fieldsets = (
        (None, {"fields": ("name", "description", "processing_mode", "protocol_adapter")}),
        ("Messages", {"fields": ("message_schema", "metrics")}),
        ("Gateways", {"fields": ("auto_register_children", "child_device_type", "max_children")}),
        ("Chunked gateways", {"fields": ("chunk_ttl_seconds", "max_chunks")}),
    )


class CertificateInline(admin.TabularInline[DeviceCertificate, Device]):
    model = DeviceCertificate
    extra = 0
    can_delete = False
    fields = ("serial_number", "fingerprint_sha256", "not_before", "not_after", "revoked_at")
    readonly_fields = fields


@admin.register(Device)
class DeviceAdmin(TenantOnlyAdmin):
    list_display = ("logical_identifier", "name", "device_type", "device_role", "status", "last_seen")
    list_filter = ("device_type", "device_role", "status", "protocol")
    search_fields = ("logical_identifier", "name")
    list_select_related = ("device_type",)
    raw_id_fields = ("parent_device",)
    readonly_fields = ("last_seen", "created_at", "updated_at")
    inlines = [CertificateInline]
