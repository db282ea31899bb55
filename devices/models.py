"""Device types (processing profiles), devices and their certificates (tenant schema)."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import current_app
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models, transaction
from django.db.models import ExpressionWrapper, F, Q, Value
from django.db.models.functions import Coalesce, Now
from django.db.models.lookups import LessThan
from django.utils import timezone

from argus.identity import is_reserved_identifier
from devices import pki, validation

log = logging.getLogger(__name__)

# No MQTT wildcard (+ #) or level separator (/): the id is a topic level and, as a certificate
# CN, the username the broker substitutes for %u in ACL patterns, which must match one topic.
logical_identifier_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
    "Letters, digits and . _ : - only (it is an MQTT topic level), at most 128 characters.",
)


def reserved_identifier_validator(value: str) -> None:
    """Refuse the names of platform services (argus/identity.py): a device so named would share
    the bridge's MQTT username, ACL rights and client id."""
    if is_reserved_identifier(value, [settings.ARGUS_BRIDGE_CLIENT_ID]):
        raise ValidationError("This name is reserved for a platform service.", code="reserved")


def crl_renew_after_commit() -> None:
    """Have a worker rebuild the CRL and reload the broker once this transaction commits.

    Only where a CA is configured: the worker needs the CA key, and without a PKI there is no
    broker to tell. The beat task (`devices.tasks.crl_renew`) catches anything this misses.
    Sent by name: the task module imports the services, which import these models.
    """
    if not (Path(settings.ARGUS_PKI_DIR) / pki.CA_CERT).exists():
        return
    transaction.on_commit(lambda: current_app.send_task("devices.tasks.crl_renew"))


class ProcessingMode(models.TextChoices):
    ENDPOINT = "endpoint", "Endpoint"
    GATEWAY = "gateway", "Gateway (child devices)"
    GATEWAY_CHUNKED = "gateway_chunked", "Chunked gateway"


class ProtocolAdapter(models.TextChoices):
    # Implemented in telemetry.adapters; the names are part of the stored profile.
    ARGUS_JSON = "argus_json", "Argus JSON (endpoint / gateway / chunk shapes)"
    FLAT_JSON = "flat_json", 'Flat JSON object of metrics ({"temperature": 21.5, "ts": ...})'


class DeviceType(models.Model):
    """A device profile: how messages from devices of this type are decoded, validated and stored."""

    name = models.CharField(max_length=120, unique=True)
    description = models.TextField(blank=True)
    processing_mode = models.CharField(max_length=20, choices=ProcessingMode.choices, default=ProcessingMode.ENDPOINT)
    protocol_adapter = models.CharField(
        max_length=40, choices=ProtocolAdapter.choices, default=ProtocolAdapter.ARGUS_JSON
    )
    message_schema = models.JSONField(
        default=dict,
        blank=True,
        help_text="JSON Schema every message must satisfy (after decoding). Empty: shape checks only.",
    )
    metrics = models.JSONField(
        default=list,
        blank=True,
        help_text='Metric keys devices of this type report, e.g. ["temperature", "humidity"].',
    )
    auto_register_children = models.BooleanField(
        default=False, help_text="Gateways: register unknown child ids automatically under the gateway."
    )
    child_device_type = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="Type given to automatically registered children (empty: the gateway's own type).",
    )
    max_children = models.PositiveIntegerField(
        default=5000, validators=[MinValueValidator(1)], help_text="Most children in one message."
    )
    chunk_ttl_seconds = models.PositiveIntegerField(
        default=60,
        validators=[MinValueValidator(1), MaxValueValidator(3600)],
        help_text="Chunked gateways: seconds from the first chunk until an incomplete transaction expires.",
    )
    max_chunks = models.PositiveIntegerField(
        default=100,
        validators=[MinValueValidator(1), MaxValueValidator(10000)],
        help_text="Chunked gateways: the largest `total` accepted.",
    )
    expected_interval_seconds = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="How often devices of this type send (seconds). A device silent for "
        "ARGUS_PRESENCE_INACTIVE_INTERVALS of these counts as inactive. Empty: never inactive.",
    )
    error_feedback = models.BooleanField(
        default=False,
        db_default=False,
        help_text="Answer each rejected MQTT message on devices/<id>/errors (msg_id and reason), "
        "rate-limited per device (docs/ingestion.md).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "device_types"
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(chunk_ttl_seconds__gte=1), name="device_types_chunk_ttl_positive"),
            models.CheckConstraint(condition=Q(max_chunks__gte=1), name="device_types_max_chunks_positive"),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors: dict[str, list[str]] = {}
        errors.update(validation.message_schema_errors(self.message_schema))
        errors.update(validation.metric_key_list_errors("metrics", self.metrics))
        if self.auto_register_children and self.processing_mode == ProcessingMode.ENDPOINT:
            errors.setdefault("auto_register_children", []).append("Only gateways have children.")
        if errors:
            raise ValidationError(errors)


class DeviceRole(models.TextChoices):
    STANDALONE = "standalone", "Standalone"
    GATEWAY = "gateway", "Gateway"
    CHILD = "child", "Child of a gateway"


class DeviceProtocol(models.TextChoices):
    MQTT = "mqtt", "MQTT"
    MQTTS = "mqtts", "MQTT over mTLS"
    HTTP = "http", "HTTP"


class DeviceStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    DISABLED = "disabled", "Disabled"


def inactive_condition() -> Q:
    """True for a device whose type has an expected interval and that was not heard from (since it
    was registered) for ARGUS_PRESENCE_INACTIVE_INTERVALS of them, by the database's clock when
    the query runs. Disabled devices are never inactive: nobody expects them to send.

    `last_seen` lags by up to 1.5 resolutions (ARGUS_LAST_SEEN_RESOLUTION_SECONDS), so that much
    is added to the silence allowed: a device sending on time is never called inactive.
    """
    slack = timedelta(seconds=1.5 * settings.ARGUS_LAST_SEEN_RESOLUTION_SECONDS)
    allowed = ExpressionWrapper(
        Value(timedelta(seconds=settings.ARGUS_PRESENCE_INACTIVE_INTERVALS))
        * F("device_type__expected_interval_seconds"),
        output_field=models.DurationField(),
    )
    cutoff = ExpressionWrapper(Now() - Value(slack) - allowed, output_field=models.DateTimeField())
    silent: LessThan[Any] = LessThan(Coalesce(F("last_seen"), F("created_at")), cutoff)
    return Q(device_type__expected_interval_seconds__isnull=False) & Q(status=DeviceStatus.ACTIVE) & Q(silent)


class DeviceQuerySet(models.QuerySet["Device"]):
    def with_presence(self) -> DeviceQuerySet:
        """Annotate `inactive` (`inactive_condition`)."""
        return self.annotate(inactive=ExpressionWrapper(inactive_condition(), output_field=models.BooleanField()))


class Device(models.Model):
    """A physical or logical device; its logical identifier is unique across the whole platform."""

    device_type = models.ForeignKey(DeviceType, on_delete=models.PROTECT, related_name="devices")
    name = models.CharField(max_length=200)
    logical_identifier = models.CharField(
        max_length=128, unique=True, validators=[logical_identifier_validator, reserved_identifier_validator]
    )
    device_role = models.CharField(max_length=20, choices=DeviceRole.choices, default=DeviceRole.STANDALONE)
    parent_device = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="children",
        db_index=False,  # devices_parent_idx below
    )
    network_metadata = models.JSONField(default=dict, blank=True)
    protocol = models.CharField(max_length=10, choices=DeviceProtocol.choices, default=DeviceProtocol.MQTT)
    status = models.CharField(max_length=20, choices=DeviceStatus.choices, default=DeviceStatus.ACTIVE)
    metadata = models.JSONField(default=dict, blank=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    # Presence (telemetry/presence.py): from the device's messages on devices/<id>/status, its
    # "online" and the broker's last will. None: the device never said.
    online = models.BooleanField(null=True, blank=True, editable=False)
    presence_since = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="When the bridge heard the current online/offline state."
    )
    # A database default: ingest registers gateway children in SQL of its own (telemetry/children.py).
    last_disconnect_reason = models.CharField(max_length=200, blank=True, editable=False, db_default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = DeviceQuerySet.as_manager()

    class Meta:
        db_table = "devices"
        ordering = ["logical_identifier"]
        constraints = [
            models.CheckConstraint(
                condition=~Q(device_role=DeviceRole.CHILD) | Q(parent_device__isnull=False),
                name="devices_child_has_parent",
            ),
            models.CheckConstraint(condition=~Q(parent_device=F("id")), name="devices_not_own_parent"),
        ]
        indexes = [models.Index(fields=["parent_device"], name="devices_parent_idx")]

    def __str__(self) -> str:
        return self.logical_identifier

    # The identity as loaded from the database, so save() can tell a rename (None: unknown).
    _loaded_logical_identifier: str | None = None

    # Written by ingest alone (telemetry/presence.py, telemetry/storage.py): a save of a copy loaded
    # before a status or a message arrived (the admin's form, an API PATCH) must not put the old
    # presence or the old last_seen back.
    PIPELINE_FIELDS = ("online", "presence_since", "last_disconnect_reason", "last_seen")

    def save(self, *args: Any, **kwargs: Any) -> None:
        from argus.registry import registry_sync

        if (
            not self._state.adding
            and not args
            and kwargs.get("update_fields") is None
            and not kwargs.get("force_insert")
        ):
            kwargs["update_fields"] = [
                f.name for f in self._meta.concrete_fields if not f.primary_key and f.name not in self.PIPELINE_FIELDS
            ]
        update_fields = kwargs.get("update_fields")
        renamed = False
        with transaction.atomic():
            if self.pk is not None and (update_fields is None or "logical_identifier" in update_fields):
                before = getattr(self, "_loaded_logical_identifier", None)
                if before is None:
                    before = Device.objects.filter(pk=self.pk).values_list("logical_identifier", flat=True).first()
                renamed = before is not None and before != self.logical_identifier
            super().save(*args, **kwargs)
            registry_sync(devices=[self])
            if renamed:
                # Its certificates name the old id, which another tenant may now register.
                self.revoke_certificates(reason="device renamed")
        self._loaded_logical_identifier = self.logical_identifier

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        from argus.registry import registry_remove

        with transaction.atomic():
            registry_remove(device_ids=[self.pk])
            # The ledger keeps the revoked serials after the certificate rows cascade away.
            self.revoke_certificates(reason="device deleted")
            return super().delete(*args, **kwargs)

    def revoke_certificates(self, *, reason: str) -> list[str]:
        """Revoke every certificate issued to this device because its identity ends (renamed or
        deleted); return the serials. Call inside the transaction that ends it.

        The certificate's CN is the old logical id, which another tenant may register next: left
        valid, it would publish into that tenant. The broker learns of it through the CRL, which
        a worker rebuilds after commit (devices.tasks.crl_renew).
        """
        from argus.models import CertificateLedgerEntry
        from argus.registry import current_schema

        at = timezone.now()
        tenant_schema = current_schema()
        serials = CertificateLedgerEntry.objects.filter(tenant_schema=tenant_schema, device_id=self.pk).revoke(
            at=at, reason=reason
        )
        DeviceCertificate.objects.filter(device_id=self.pk, revoked_at__isnull=True).update(
            revoked_at=at, revocation_reason=reason[:64]
        )
        if serials:
            log.info("revoked %d certificate(s) of device %s in %s: %s", len(serials), self.pk, tenant_schema, reason)
            crl_renew_after_commit()
        return serials

    @classmethod
    def from_db(cls, db: str | None, field_names: Any, values: Any) -> Device:
        instance = super().from_db(db, field_names, values)
        instance._loaded_logical_identifier = instance.__dict__.get("logical_identifier")
        return instance

    def clean(self) -> None:
        from argus.models import DeviceRegistration
        from argus.registry import current_schema

        errors: dict[str, list[str]] = {}
        if self.device_role == DeviceRole.CHILD and self.parent_device_id is None:
            errors.setdefault("parent_device", []).append("A child device needs its gateway.")
        if self.parent_device_id is not None and self.parent_device_id == self.pk:
            errors.setdefault("parent_device", []).append("A device cannot be its own parent.")
        if self.logical_identifier:
            taken = DeviceRegistration.objects.filter(logical_identifier=self.logical_identifier).exclude(
                tenant__schema_name=current_schema(), device_id=self.pk or 0
            )
            if taken.exists():
                errors.setdefault("logical_identifier", []).append(
                    "This logical identifier is already used on this platform."
                )
        if errors:
            raise ValidationError(errors)


def presence_text(device: Device) -> str:
    """`online since …`, `offline since … (reason)`, `unknown`; `inactive` added when silent for
    its type's allowed intervals (`Device.objects.with_presence()`)."""
    if device.online is None or device.presence_since is None:
        text = "unknown"
    else:
        since = timezone.localtime(device.presence_since).strftime("%Y-%m-%d %H:%M:%S")
        text = f"{'online' if device.online else 'offline'} since {since}"
        if not device.online and device.last_disconnect_reason:
            text += f" ({device.last_disconnect_reason})"
    if getattr(device, "inactive", False):
        text += ", inactive"
    return text


class DeviceCertificate(models.Model):
    """An X.509 client certificate our CA issued to a device (public part only)."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="certificates")
    serial_number = models.CharField(max_length=64, unique=True)
    fingerprint_sha256 = models.CharField(max_length=64, unique=True)
    subject_cn = models.CharField(max_length=128)
    not_before = models.DateTimeField()
    not_after = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    revocation_reason = models.CharField(max_length=64, blank=True)
    pem = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "device_certificates"
        ordering = ["-not_before"]
        constraints = [
            models.CheckConstraint(condition=Q(not_after__gt=F("not_before")), name="device_certs_valid_period"),
        ]

    def __str__(self) -> str:
        return f"{self.subject_cn} #{self.serial_number}"
