"""Celery tasks of the device PKI (thin wrappers around devices.services)."""

from __future__ import annotations

from celery import shared_task

from devices.services import certificate_crl_renew


@shared_task(ignore_result=True)
def crl_renew() -> None:
    """Rebuild the CRL from the ledger when it runs out soon or lacks a revocation; reload the broker."""
    certificate_crl_renew()
