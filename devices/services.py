"""Device workflows that write to the database and to systems outside it."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from django.db import transaction
from django.utils import timezone
from django_tenants.utils import schema_context

from argus.models import DeviceAPIKey, Organization
from argus.registry import registry_lookup
from devices import pki
from devices.models import Device, DeviceCertificate

logger = logging.getLogger(__name__)


def certificate_issue(
    *, device: Device, out_dir: Path, days: int, passphrase: bytes | None = None
) -> DeviceCertificate:
    """Issue an mTLS client certificate (CN = logical id) for the device and record it."""
    issued = pki.issue_device(out_dir, device.logical_identifier, days=days, passphrase=passphrase)
    try:
        return DeviceCertificate.objects.create(
            device=device,
            serial_number=issued.serial,
            fingerprint_sha256=issued.fingerprint_sha256,
            subject_cn=issued.subject_cn,
            not_before=issued.not_before,
            not_after=issued.not_after,
            pem=issued.pem,
        )
    except Exception:
        # An unrecorded certificate could never be revoked by logical id: do not leave it usable.
        logger.exception("recording certificate %s for %s failed; deleting its files", issued.serial, device)
        issued.key_path.unlink(missing_ok=True)
        issued.cert_path.unlink(missing_ok=True)
        raise


def certificate_revoke(
    *,
    device: Device,
    serial: str | None = None,
    reason: str = "",
    at: datetime | None = None,
) -> list[DeviceCertificate]:
    """Mark the device's certificate `serial` (or all its unrevoked ones) revoked; return those revoked."""
    at = at or timezone.now()
    with transaction.atomic():
        certificates = DeviceCertificate.objects.select_for_update().filter(device=device, revoked_at__isnull=True)
        if serial is not None:
            normalized = pki.normalize_serial(serial)
            if not DeviceCertificate.objects.filter(device=device, serial_number=normalized).exists():
                raise DeviceCertificate.DoesNotExist(f"{device} has no certificate with serial {normalized}")
            certificates = certificates.filter(serial_number=normalized)
        revoked = list(certificates)
        DeviceCertificate.objects.filter(pk__in=[c.pk for c in revoked]).update(
            revoked_at=at, revocation_reason=reason[:64]
        )
    for certificate in revoked:
        certificate.revoked_at, certificate.revocation_reason = at, reason[:64]
    return revoked


def certificate_revocations() -> list[tuple[str, datetime]]:
    """Return (serial, revoked at) of every revoked device certificate in every tenant."""
    revoked: list[tuple[str, datetime]] = []
    for schema in Organization.objects.exclude(schema_name="public").values_list("schema_name", flat=True):
        with schema_context(schema):
            rows = DeviceCertificate.objects.filter(revoked_at__isnull=False).values_list("serial_number", "revoked_at")
            revoked.extend((serial, at) for serial, at in rows if at is not None)
    return revoked


def certificate_crl_publish(*, out_dir: Path, days: int = 7, passphrase: bytes | None = None) -> tuple[Path, int]:
    """Rebuild the CRL file from the database; return its path and how many serials it lists."""
    revoked = certificate_revocations()
    return pki.build_crl(out_dir, revoked, days=days, passphrase=passphrase), len(revoked)


# --------------------------------------------------------------------------- HTTP API keys


def _registered_schema(logical_id: str, tenant_schema: str | None) -> str:
    """The schema owning a device, from the public registry; refuses a device it does not hold."""
    owner = registry_lookup(logical_id)
    if owner is None:
        raise Device.DoesNotExist(f"device {logical_id!r} is not registered in any tenant")
    if tenant_schema is not None and owner != tenant_schema:
        raise Device.DoesNotExist(f"device {logical_id!r} does not belong to tenant {tenant_schema!r}")
    with schema_context(owner):
        if not Device.objects.filter(logical_identifier=logical_id).exists():
            raise Device.DoesNotExist(f"device {logical_id!r} is registered to {owner!r} but not found there")
    return owner


def api_key_create(
    *, logical_id: str, tenant_schema: str | None = None, expiry_date: datetime | None = None
) -> tuple[DeviceAPIKey, str]:
    """Issue an HTTP API key for a device; returns the record and the key, which is never stored."""
    schema = _registered_schema(logical_id, tenant_schema)
    tenant = Organization.objects.get(schema_name=schema)
    api_key, key = DeviceAPIKey.objects.create_key(
        name=logical_id[:50], tenant=tenant, logical_identifier=logical_id, expiry_date=expiry_date
    )
    assert isinstance(api_key, DeviceAPIKey)  # the library's manager is typed for its base class
    logger.info("issued API key %s for %s in %s", api_key.prefix, logical_id, schema)
    return api_key, key


def api_key_revoke(*, logical_id: str | None = None, prefix: str | None = None) -> int:
    """Revoke the key with this prefix, or every unrevoked key of a device; returns how many."""
    if logical_id is None and prefix is None:
        raise ValueError("name a device or a key prefix")
    keys = DeviceAPIKey.objects.filter(revoked=False)
    if logical_id is not None:
        keys = keys.filter(logical_identifier=logical_id)
    if prefix is not None:
        keys = keys.filter(prefix=prefix)
    count = keys.update(revoked=True)
    logger.info("revoked %d API key(s) device=%s prefix=%s", count, logical_id, prefix)
    return count
