"""Platform admin (public schema): organizations, domains, the device registry, the certificate ledger."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.paginator import Paginator
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.functional import cached_property
from django_tenants.utils import get_public_schema_name
from rest_framework.authtoken.admin import TokenAdmin
from rest_framework.authtoken.models import TokenProxy
from rest_framework_api_key import admin as _api_key_admin  # noqa: F401 - registers APIKey, removed below
from rest_framework_api_key.models import APIKey

from argus.models import CertificateLedgerEntry, DeviceAPIKey, DeviceRegistration, Domain, Organization
from argus.registry import current_schema


def on_public_schema() -> bool:
    """Whether this request is served by the public (platform) site."""
    return current_schema() == get_public_schema_name()


class PrettyJSONWidget(forms.Textarea):
    """A JSON field edited as indented JSON in a monospace box (device types' schemas, metadata)."""

    def __init__(self, attrs: dict[str, Any] | None = None) -> None:
        super().__init__(attrs={"rows": 14, "cols": 90, "style": "font-family: monospace", **(attrs or {})})

    def format_value(self, value: Any) -> str | None:
        text = super().format_value(value)
        if not text:
            return text
        try:
            return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except ValueError:
            return text  # what the user typed, refused by the field: shown as typed


class BoundedCountPaginator(Paginator):
    """Counts at most COUNT_LIMIT rows: a list over millions of rows (the raw audit trail) must
    not count them all on every page view. Beyond the limit the admin shows "10,000+" pages' worth;
    filters and search narrow it down."""

    COUNT_LIMIT = 10_000

    @cached_property
    def count(self) -> int:
        rows: QuerySet[Any] = self.object_list  # type: ignore[assignment]  # the admin pages querysets
        return int(rows[: self.COUNT_LIMIT + 1].count())


class SchemaScopedAdmin(admin.ModelAdmin[Any]):
    """Shows a model only on the sites whose schema holds its table (public or tenant)."""

    public_only = False
    formfield_overrides = {models.JSONField: {"widget": PrettyJSONWidget}}

    def _on_its_schema(self) -> bool:
        return on_public_schema() == self.public_only

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self._on_its_schema() and super().has_module_permission(request)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self._on_its_schema() and super().has_view_permission(request, obj)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return self._on_its_schema() and super().has_add_permission(request)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self._on_its_schema() and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self._on_its_schema() and super().has_delete_permission(request, obj)


class PublicOnlyAdmin(SchemaScopedAdmin):
    """Platform tables (public schema)."""

    public_only = True


class TenantOnlyAdmin(SchemaScopedAdmin):
    """Tenant tables (each tenant's schema)."""

    public_only = False


class DomainInline(admin.TabularInline[Domain, Organization]):
    model = Domain
    extra = 0


@admin.register(Organization)
class OrganizationAdmin(PublicOnlyAdmin):
    list_display = ("name", "schema_name", "retention_days", "created_at")
    search_fields = ("name", "schema_name")
    inlines = [DomainInline]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        # The schema name is the tenant's storage: renaming it would orphan the schema.
        return ("schema_name",) if obj else ()


@admin.register(CertificateLedgerEntry)
class CertificateLedgerAdmin(PublicOnlyAdmin):
    """Read-only: entries are written by issuing and revoking (`manage.py pki`, renames, deletes)."""

    list_display = ("logical_identifier", "serial_number", "tenant_schema", "status", "not_after", "revoked_at")
    list_filter = ("status", "tenant_schema")
    search_fields = ("logical_identifier", "serial_number", "fingerprint_sha256")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Deleting an entry would drop a revoked serial from the CRL.
        return False


@admin.register(DeviceRegistration)
class DeviceRegistrationAdmin(PublicOnlyAdmin):
    list_display = ("logical_identifier", "tenant", "device_id", "created_at")
    list_filter = ("tenant",)
    search_fields = ("logical_identifier",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# Device keys are argus.DeviceAPIKey; the library's generic key model is unused and stays hidden.
if admin.site.is_registered(APIKey):
    admin.site.unregister(APIKey)


# The read API's user tokens live in each tenant's schema: shown on tenant sites only.
if admin.site.is_registered(TokenProxy):
    admin.site.unregister(TokenProxy)


@admin.register(TokenProxy)
class UserTokenAdmin(TenantOnlyAdmin, TokenAdmin):
    """Tokens of the read API (`Authorization: Token <key>`), one per user of the tenant."""


@admin.register(DeviceAPIKey)
class DeviceAPIKeyAdmin(PublicOnlyAdmin):
    """Lists device keys and revokes them; keys are issued by `create_device_key`, which shows them once."""

    list_display = ("prefix", "logical_identifier", "tenant", "revoked", "expiry_date", "created_at")
    list_filter = ("revoked", "tenant")
    search_fields = ("logical_identifier", "prefix")
    list_select_related = ("tenant",)
    fields = ("prefix", "logical_identifier", "tenant", "name", "revoked", "expiry_date", "created_at")
    readonly_fields = fields
    actions = ["revoke_keys"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Revoke instead: the row records that the key existed and who held it.
        return False

    @admin.action(description="Revoke selected keys (cannot be undone)", permissions=["change"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[DeviceAPIKey]) -> None:
        count = queryset.filter(revoked=False).update(revoked=True)
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)
