"""Public-schema models: tenants, their domains and the global device registry."""

from __future__ import annotations

from datetime import datetime

from django.db import models
from django_tenants.models import DomainMixin, TenantMixin
from rest_framework_api_key.models import AbstractAPIKey


class Organization(TenantMixin):
    """A tenant: one PostgreSQL schema holding its types, devices, assets and telemetry."""

    name: models.CharField[str, str] = models.CharField(max_length=200)
    created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField(auto_now_add=True)

    auto_create_schema = True

    class Meta:
        db_table = "organizations"

    def __str__(self) -> str:
        return f"{self.name} ({self.schema_name})"


class Domain(DomainMixin):
    """A host name that routes web requests to a tenant."""

    class Meta:
        db_table = "domains"


class DeviceRegistration(models.Model):
    """Routes a platform-wide unique logical identifier to the tenant that owns the device.

    The bridge and the HTTP endpoint read this to find a message's tenant without searching
    every schema. It is derived from `devices.Device` and kept in step by its save/delete.
    """

    logical_identifier = models.CharField(max_length=128, unique=True)
    tenant = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="registrations")
    device_id = models.BigIntegerField(help_text="Primary key of the device in its tenant schema.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "device_registry"
        constraints = [
            models.UniqueConstraint(fields=["tenant", "device_id"], name="device_registry_tenant_device_uniq"),
        ]

    def __str__(self) -> str:
        return f"{self.logical_identifier} -> {self.tenant.schema_name}"


class DeviceAPIKey(AbstractAPIKey):
    """An HTTP ingestion credential of one device; only a hash of the secret part is stored.

    It lives in the public schema because a request must be routed to its tenant before the
    tenant is known. The key names its device: the device written is always this one.
    """

    # The base's `created` is replaced by `created_at`, the name every other table uses.
    created = None  # type: ignore[assignment]
    tenant = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="device_api_keys")
    logical_identifier = models.CharField(max_length=128, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta(AbstractAPIKey.Meta):
        db_table = "device_api_keys"
        ordering = ("-created_at",)
        verbose_name = "device API key"
        verbose_name_plural = "device API keys"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.logical_identifier})"
