"""Readiness check of the device PKI: the broker's CRL must not run out soon (see argus/health.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from argus.health import CheckResult
from devices import pki


def crl_check() -> CheckResult:
    """The CRL in ARGUS_PKI_DIR is valid for at least ARGUS_READY_CRL_MIN_SECONDS more.

    Once a CRL's next update has passed, OpenSSL refuses every client certificate: every mTLS
    device and the bridge are locked out. Skipped when no CRL is configured.
    """
    path = Path(settings.ARGUS_PKI_DIR) / pki.CRL_FILE
    if not path.exists():
        return CheckResult("crl", None, "no CRL configured")
    try:
        crl = pki.load_crl(path)
    except ValueError as exc:
        return CheckResult("crl", False, f"the CRL is not readable: {exc}")
    next_update = crl.next_update_utc
    if next_update is None:
        return CheckResult("crl", False, "the CRL has no next update time")
    left = next_update - timezone.now()
    detail = f"next update {next_update.isoformat()} ({left.total_seconds() / 3600:.1f} h left)"
    if left < timedelta(seconds=settings.ARGUS_READY_CRL_MIN_SECONDS):
        return CheckResult("crl", False, detail + "; is the crl_renew beat task running?")
    return CheckResult("crl", True, detail)
