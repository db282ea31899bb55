"""Device workflows that write to the database and to systems outside it."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from django.db import transaction
from django.utils import timezone
from django_tenants.utils import schema_context

from argus.models import Organization
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
