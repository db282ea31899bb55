"""Public-schema models: tenants, their domains and the global device registry."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone
from django_tenants.models import DomainMixin, TenantMixin
from rest_framework_api_key.models import AbstractAPIKey

# Ten years: a retention beyond it is a typo (and at one partition a day, 3,650 tables a table).
RETENTION_MAX_DAYS = 3650


class Organization(TenantMixin):
    """A tenant: one PostgreSQL schema holding its types, devices, assets and telemetry."""

    name: models.CharField[str, str] = models.CharField(max_length=200)
    created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField(auto_now_add=True)
    # Days of telemetry (history and raw) kept; empty: the platform's ARGUS_RETENTION_DAYS.
    retention_days: models.PositiveIntegerField[int | None, int | None] = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(RETENTION_MAX_DAYS)],
        help_text="Days of telemetry kept (history and raw messages). Empty: the platform default.",
    )

    auto_create_schema = True

    class Meta:
        db_table = "organizations"

    def __str__(self) -> str:
        return f"{self.name} ({self.schema_name})"

    @property
    def effective_retention_days(self) -> int:
        """Days of telemetry kept for this tenant: its own setting, else the platform's."""
        return self.retention_days or int(settings.ARGUS_RETENTION_DAYS)

    def delete(self, force_drop: bool = False, *args: Any, **kwargs: Any) -> Any:
        # The tenant's certificates must not outlive it: another tenant may register its ids next.
        CertificateLedgerEntry.objects.filter(tenant=self, status=CertificateStatus.ACTIVE).update(
            status=CertificateStatus.REVOKED, revoked_at=timezone.now(), revocation_reason="tenant deleted"
        )
        return super().delete(force_drop, *args, **kwargs)


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


class CertificateStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    REVOKED = "revoked", "Revoked"


class CertificateLedgerQuerySet(models.QuerySet["CertificateLedgerEntry"]):
    """Ledger entries, with the one write every revocation path shares."""

    def revoke(self, *, at: datetime, reason: str) -> list[str]:
        """Mark the active entries among these revoked (locking them first); return their serials."""
        serials = list(
            self.select_for_update().filter(status=CertificateStatus.ACTIVE).values_list("serial_number", flat=True)
        )
        CertificateLedgerEntry.objects.filter(serial_number__in=serials).update(
            status=CertificateStatus.REVOKED, revoked_at=at, revocation_reason=reason[:64]
        )
        return serials


class CertificateLedgerEntry(models.Model):
    """Every device certificate the CA issued, platform-wide: the CRL is built from this table.

    It lives in the public schema and refers to its device by (tenant, device id, logical id)
    without a foreign key, so an entry outlives the device row, a rename and the tenant itself:
    a revoked serial can never drop out of the CRL because its device was deleted.
    """

    serial_number = models.CharField(max_length=64, unique=True)
    fingerprint_sha256 = models.CharField(max_length=64, unique=True)
    logical_identifier = models.CharField(max_length=128, help_text="The certificate's CN when it was issued.")
    tenant = models.ForeignKey(Organization, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    tenant_schema = models.CharField(max_length=63, help_text="Kept when the tenant is deleted.")
    device_id = models.BigIntegerField(help_text="Primary key of the device in its tenant schema when issued.")
    not_before = models.DateTimeField()
    not_after = models.DateTimeField()
    status = models.CharField(max_length=10, choices=CertificateStatus.choices, default=CertificateStatus.ACTIVE)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revocation_reason = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = CertificateLedgerQuerySet.as_manager()

    class Meta:
        db_table = "certificate_ledger"
        verbose_name = "certificate ledger entry"
        verbose_name_plural = "certificate ledger"
        indexes = [
            models.Index(fields=["tenant_schema", "device_id"], name="cert_ledger_device_idx"),
            models.Index(fields=["status", "not_after"], name="cert_ledger_status_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(status=CertificateStatus.ACTIVE) | models.Q(revoked_at__isnull=False),
                name="cert_ledger_revoked_has_time",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.logical_identifier} #{self.serial_number} ({self.status})"
