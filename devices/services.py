"""Device workflows that write to the database and to systems outside it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django_tenants.utils import schema_context

from argus.identity import is_reserved_identifier
from argus.models import CertificateLedgerEntry, CertificateStatus, DeviceAPIKey, Organization
from argus.registry import current_tenant, registry_lookup
from devices import pki
from devices.models import Device, DeviceCertificate

logger = logging.getLogger(__name__)


def certificate_issue(
    *, device: Device, out_dir: Path, days: int, passphrase: bytes | None = None
) -> DeviceCertificate:
    """Issue an mTLS client certificate (CN = logical id) for the device, record it and enter it in the ledger."""
    if is_reserved_identifier(device.logical_identifier, [settings.ARGUS_BRIDGE_CLIENT_ID]):
        raise pki.PkiError(f"{device.logical_identifier!r} is reserved for a platform service")
    issued = pki.issue_device(out_dir, device.logical_identifier, days=days, passphrase=passphrase)
    try:
        with transaction.atomic():
            tenant = current_tenant()
            CertificateLedgerEntry.objects.create(
                serial_number=issued.serial,
                fingerprint_sha256=issued.fingerprint_sha256,
                logical_identifier=issued.subject_cn,
                tenant=tenant,
                tenant_schema=tenant.schema_name,
                device_id=device.pk,
                not_before=issued.not_before,
                not_after=issued.not_after,
            )
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
        CertificateLedgerEntry.objects.filter(serial_number__in=[c.serial_number for c in revoked]).revoke(
            at=at,
            reason=reason,
        )
    for certificate in revoked:
        certificate.revoked_at, certificate.revocation_reason = at, reason[:64]
    return revoked


def certificate_ledger_reconcile(*, at: datetime | None = None) -> int:
    """Revoke active ledger entries whose identity is gone; return how many.

    An entry is gone when its tenant was deleted, or its device no longer exists under the
    logical id the certificate names (deleted or renamed by a path that skipped the model,
    such as a bulk delete or raw SQL). One query per tenant holding active certificates.
    """
    at = at or timezone.now()
    revoked = 0
    with transaction.atomic():
        revoked += len(
            CertificateLedgerEntry.objects.filter(tenant__isnull=True).revoke(at=at, reason="tenant deleted")
        )
        active = (
            CertificateLedgerEntry.objects.filter(status=CertificateStatus.ACTIVE)
            .values_list("tenant_schema", "serial_number", "device_id", "logical_identifier")
            .order_by("tenant_schema")
        )
        by_schema: dict[str, list[tuple[str, int, str]]] = {}
        for schema, serial, device_id, logical_id in active:
            by_schema.setdefault(schema, []).append((serial, device_id, logical_id))
        for schema, entries in by_schema.items():
            with schema_context(schema):
                alive = set(
                    Device.objects.filter(pk__in=[device_id for _, device_id, _ in entries]).values_list(
                        "pk", "logical_identifier"
                    )
                )
            gone = [serial for serial, device_id, logical_id in entries if (device_id, logical_id) not in alive]
            if gone:
                revoked += len(
                    CertificateLedgerEntry.objects.filter(serial_number__in=gone).revoke(at=at, reason="identity gone")
                )
    if revoked:
        logger.warning("certificate ledger: revoked %d certificate(s) whose device or tenant is gone", revoked)
    return revoked


def certificate_revocations(*, at: datetime | None = None) -> list[tuple[str, datetime]]:
    """Return (serial, revoked at) of every revoked device certificate that has not yet expired.

    From the ledger, so a serial stays listed after its device and tenant are gone. An expired
    certificate fails the broker's validity check anyway, so it leaves the list a day after
    expiry (clock skew), which keeps the CRL the size of the live fleet.
    """
    cutoff = (at or timezone.now()) - timedelta(days=1)
    rows = (
        CertificateLedgerEntry.objects.filter(status=CertificateStatus.REVOKED, not_after__gt=cutoff)
        .order_by("revoked_at")
        .values_list("serial_number", "revoked_at")
    )
    return [(serial, revoked_at) for serial, revoked_at in rows if revoked_at is not None]


def certificate_crl_publish(*, out_dir: Path, days: int = 7, passphrase: bytes | None = None) -> tuple[Path, int]:
    """Rebuild the CRL file from the ledger; return its path and how many serials it lists."""
    revoked = certificate_revocations()
    return pki.build_crl(out_dir, revoked, days=days, passphrase=passphrase), len(revoked)


@dataclass(frozen=True)
class CrlRenewal:
    """What `certificate_crl_renew` did."""

    path: Path
    rebuilt: bool
    reason: str
    listed: int
    next_update: datetime
    reloaded: bool


def certificate_crl_renew(
    *,
    out_dir: Path | None = None,
    days: int | None = None,
    renew_within: timedelta | None = None,
    passphrase: bytes | None = None,
) -> CrlRenewal | None:
    """Keep the broker's CRL current: rebuild it from the ledger when it is missing, runs out
    within `renew_within`, or lacks a revoked serial; then run the broker reload hook.
    Returns None when no CA is configured in out_dir (nothing to do)."""
    out_dir = Path(out_dir or settings.ARGUS_PKI_DIR)
    if not (out_dir / pki.CA_KEY).exists():
        return None
    days = days or settings.ARGUS_CRL_DAYS
    renew_within = renew_within or timedelta(seconds=settings.ARGUS_CRL_RENEW_WITHIN_SECONDS)
    certificate_ledger_reconcile()
    revoked = certificate_revocations()
    path = out_dir / pki.CRL_FILE
    reason = ""
    if not path.exists():
        reason = "missing"
    else:
        current = pki.load_crl(path)
        next_update = current.next_update_utc
        if next_update is None or next_update - timezone.now() < renew_within:
            reason = "expiring"
        elif {pki.normalize_serial(s) for s, _ in revoked} - {format(r.serial_number, "x") for r in current}:
            reason = "new revocations"
    if not reason:
        current = pki.load_crl(path)
        assert current.next_update_utc is not None
        _publish_public(out_dir)
        return CrlRenewal(path, False, "current", len(revoked), current.next_update_utc, False)
    pki.build_crl(out_dir, revoked, days=days, passphrase=passphrase or passphrase_from_env())
    _publish_public(out_dir)
    next_update = pki.load_crl(path).next_update_utc
    assert next_update is not None
    reloaded = pki.reload_broker(
        pid_file=settings.ARGUS_BROKER_PID_FILE or None, command=settings.ARGUS_BROKER_RELOAD_COMMAND or None
    )
    logger.info(
        "CRL rebuilt (%s): %d serial(s), valid until %s, broker %s",
        reason,
        len(revoked),
        next_update.isoformat(),
        "reloaded" if reloaded else "NOT reloaded (no ARGUS_BROKER_PID_FILE / ARGUS_BROKER_RELOAD_COMMAND)",
    )
    return CrlRenewal(path, True, reason, len(revoked), next_update, reloaded)


def _publish_public(out_dir: Path) -> None:
    """Keep the public copy of the CA certificate and CRL (ARGUS_PKI_PUBLIC_DIR) in step."""
    if settings.ARGUS_PKI_PUBLIC_DIR:
        pki.publish_public_files(out_dir, Path(settings.ARGUS_PKI_PUBLIC_DIR))


def passphrase_from_env() -> bytes | None:
    """The CA key passphrase from the environment (ARGUS_PKI_PASSPHRASE), never from a command line
    (which ps shows): for unattended renewal and the commands."""
    value = os.environ.get(pki.PASSPHRASE_ENV, "")
    return value.encode("utf-8") if value else None


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


def api_key_revoke(
    *, logical_id: str | None = None, prefix: str | None = None, tenant_schema: str | None = None
) -> int:
    """Revoke the key with this prefix, or every unrevoked key of a device (of one tenant's, when
    named: a tenant's admin touches only its own keys); returns how many."""
    if logical_id is None and prefix is None:
        raise ValueError("name a device or a key prefix")
    keys = DeviceAPIKey.objects.filter(revoked=False)
    if tenant_schema is not None:
        keys = keys.filter(tenant__schema_name=tenant_schema)
    if logical_id is not None:
        keys = keys.filter(logical_identifier=logical_id)
    if prefix is not None:
        keys = keys.filter(prefix=prefix)
    count = keys.update(revoked=True)
    logger.info("revoked %d API key(s) device=%s prefix=%s", count, logical_id, prefix)
    return count
