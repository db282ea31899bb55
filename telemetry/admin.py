"""Read-only admin views of the raw audit trail and chunked transactions, and the platform
admin's list of dead letters."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from argus.admin import TenantOnlyAdmin, on_public_schema
from telemetry.deadletters import deadletters_list, reason_codes
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


def deadletters_view(request: HttpRequest) -> HttpResponse:
    """The platform admin's list of dead letters (`?reason=` filters): they may belong to no
    tenant or to any, so only a superuser on the public site sees them."""
    if not on_public_schema() or not getattr(request.user, "is_superuser", False):
        raise Http404("No dead letters here.")
    reason = request.GET.get("reason") or None
    letters = deadletters_list(reason=reason, limit=200)
    context = {
        **admin.site.each_context(request),
        "title": "Dead letters",
        "letters": letters,
        "reason": reason,
        "codes": list(reason_codes(letters if reason is None else deadletters_list(limit=1000))),
    }
    return TemplateResponse(request, "admin/telemetry/deadletters.html", context)
