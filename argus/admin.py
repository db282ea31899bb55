"""Platform admin (public schema): organizations, domains, the device registry."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db import connection
from django.http import HttpRequest
from django_tenants.utils import get_public_schema_name

from argus.models import DeviceRegistration, Domain, Organization


def on_public_schema() -> bool:
    """Whether this request is served by the public (platform) site."""
    return bool(connection.schema_name == get_public_schema_name())


class SchemaScopedAdmin(admin.ModelAdmin[Any]):
    """Shows a model only on the sites whose schema holds its table (public or tenant)."""

    public_only = False

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
    list_display = ("name", "schema_name", "created_at")
    search_fields = ("name", "schema_name")
    inlines = [DomainInline]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        # The schema name is the tenant's storage: renaming it would orphan the schema.
        return ("schema_name",) if obj else ()


@admin.register(DeviceRegistration)
class DeviceRegistrationAdmin(PublicOnlyAdmin):
    list_display = ("logical_identifier", "tenant", "device_id", "created_at")
    list_filter = ("tenant",)
    search_fields = ("logical_identifier",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
