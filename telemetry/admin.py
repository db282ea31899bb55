"""Read-only admin views of the raw audit trail and chunked transactions."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from argus.admin import TenantOnlyAdmin
from telemetry.models import TelemetryRaw, TelemetryTransaction


class ReadOnlyAdmin(TenantOnlyAdmin):
    """Audit data: viewable, never edited from the admin."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(TelemetryRaw)
class TelemetryRawAdmin(ReadOnlyAdmin):
    list_display = ("received_at", "logical_identifier", "status", "reason", "readings", "transport", "msg_id")
    list_filter = ("status", "transport")
    search_fields = ("logical_identifier", "msg_id")
    date_hierarchy = "received_at"
    show_full_result_count = False


@admin.register(TelemetryTransaction)
class TelemetryTransactionAdmin(ReadOnlyAdmin):
    list_display = ("transaction_id", "device", "status", "received_chunks", "expected_chunks", "first_chunk_at")
    list_filter = ("status",)
    search_fields = ("transaction_id",)
    list_select_related = ("device",)
