"""Read-only admin views of the raw audit trail and chunked transactions, and the platform
admin's list of dead letters."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils.html import format_html

from argus.admin import BoundedCountPaginator, TenantOnlyAdmin, on_public_schema
from devices.models import Device
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


PAYLOAD_SHOWN_BYTES = 64 * 1024


@admin.register(TelemetryRaw)
class TelemetryRawAdmin(ReadOnlyAdmin):
    """The audit trail, tens of millions of rows a day: the list never counts or scans it whole
    (no date hierarchy, whose year/month links read every row; a bounded count; search by device
    or by `<device>/m/<msg_id>` through indexes)."""

    list_display = ("received_at", "logical_identifier", "status", "reason", "readings", "transport", "msg_id")
    list_filter = ("status", "transport", ("received_at", admin.DateFieldListFilter))
    search_fields = ("logical_identifier",)
    search_help_text = "A device's logical id, or <logical id>/m/<msg_id> for one message."
    # Newest first by id: the primary key (id, received_at) gives that order in every daily
    # partition (a merge of index scans), where ordering by received_at sorts each partition whole.
    ordering = ("-id",)
    paginator = BoundedCountPaginator
    show_full_result_count = False
    fields = (
        "received_at", "stored_at", "logical_identifier", "device", "msg_id", "ingest_key",
        "transport", "status", "reason", "readings", "payload_shown",
    )  # fmt: skip
    readonly_fields = fields

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[TelemetryRaw], search_term: str
    ) -> tuple[QuerySet[TelemetryRaw], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        if "/m/" in term:
            return queryset.filter(ingest_key=term), False
        device_ids = list(Device.objects.filter(logical_identifier=term).values_list("pk", flat=True))
        return queryset.filter(device_id__in=device_ids), False

    @admin.display(description="payload")
    def payload_shown(self, obj: TelemetryRaw) -> str:
        """The bytes as received: indented JSON when they are JSON, else a hex dump."""
        data = bytes(obj.payload)
        more = f"\n… {len(data) - PAYLOAD_SHOWN_BYTES} more bytes" if len(data) > PAYLOAD_SHOWN_BYTES else ""
        shown = data[:PAYLOAD_SHOWN_BYTES]
        try:
            text = json.dumps(json.loads(shown.decode("utf-8")), indent=2, ensure_ascii=False)
        except (UnicodeDecodeError, ValueError):
            text = _hexdump(shown)
        return format_html('<pre style="white-space: pre-wrap">{}{}</pre>', text, more)


def _hexdump(data: bytes) -> str:
    lines = []
    for offset in range(0, len(data), 16):
        row = data[offset : offset + 16]
        printable = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{offset:08x}  {row.hex(' '):<47}  {printable}")
    return "\n".join(lines)


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
