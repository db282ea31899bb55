"""Public-schema models: tenants, their domains and the global device registry."""

from __future__ import annotations

from django.db import models
from django_tenants.models import DomainMixin, TenantMixin


class Organization(TenantMixin):
    """A tenant: one PostgreSQL schema holding its types, devices, assets and telemetry."""

    name = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)

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
