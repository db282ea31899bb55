"""System checks (`manage.py check`, and before every command that runs one) of settings that
are each well-formed but do not work together: the process would start and fail later, far
from the variable that caused it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register


@register("argus")
def bridge_certificates_check(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """An mqtts:// broker needs the bridge's certificate, key and the CA to check the broker with."""
    if not settings.MQTT_URL.startswith("mqtts://"):
        return []
    files = {
        "ARGUS_BRIDGE_CERT": settings.ARGUS_BRIDGE_CERT,
        "ARGUS_BRIDGE_KEY": settings.ARGUS_BRIDGE_KEY,
        "ARGUS_BRIDGE_CA": settings.ARGUS_BRIDGE_CA,
    }
    return [
        Error(
            f"MQTT_URL is mqtts:// but {name} names no file ({path}).",
            hint="Issue the bridge's certificate: python manage.py pki issue-client argus-bridge "
            "(docs/device-identity.md, 'The bridge'), or set the variable to your files.",
            id="argus.E001",
        )
        for name, path in files.items()
        if not Path(path).is_file()
    ]


@register("argus")
def ingest_limits_check(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """runingest's batch fits in what JetStream lets it hold unacknowledged."""
    if settings.ARGUS_INGEST_BATCH > settings.ARGUS_INGEST_MAX_ACK_PENDING:
        return [
            Error(
                f"ARGUS_INGEST_BATCH ({settings.ARGUS_INGEST_BATCH}) is above ARGUS_INGEST_MAX_ACK_PENDING "
                f"({settings.ARGUS_INGEST_MAX_ACK_PENDING}): a batch could never fill.",
                hint="Keep the batch well below the ack-pending limit (defaults 1000 and 20000).",
                id="argus.E002",
            )
        ]
    return []


@register("argus")
def bounds_check(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Settings that must be positive (or not negative) to mean anything."""
    positive = {
        "ARGUS_INGEST_BATCH": settings.ARGUS_INGEST_BATCH,
        "ARGUS_READY_CHECK_TIMEOUT_SECONDS": settings.ARGUS_READY_CHECK_TIMEOUT_SECONDS,
        "ARGUS_RETENTION_DAYS": settings.ARGUS_RETENTION_DAYS,
        "ARGUS_API_MAX_PAGE_SIZE": settings.ARGUS_API_MAX_PAGE_SIZE,
        "ARGUS_LIVE_PING_SECONDS": settings.ARGUS_LIVE_PING_SECONDS,
        # The answers on devices/<id>/errors must stay limited: no "0 = off" here.
        "ARGUS_DEVICE_ERRORS_RATE": settings.ARGUS_DEVICE_ERRORS_RATE,
        "ARGUS_DEVICE_ERRORS_BURST": settings.ARGUS_DEVICE_ERRORS_BURST,
        "ARGUS_PRESENCE_INACTIVE_INTERVALS": settings.ARGUS_PRESENCE_INACTIVE_INTERVALS,
    }
    messages: list[CheckMessage] = [
        Error(f"{name} must be above 0 (is {value}).", id="argus.E003")
        for name, value in positive.items()
        if value <= 0
    ]
    if settings.ARGUS_LIVE_INTERVAL_SECONDS < 0:
        messages.append(Error("ARGUS_LIVE_INTERVAL_SECONDS must be 0 (off) or more.", id="argus.E003"))
    if settings.ARGUS_API_PAGE_SIZE > settings.ARGUS_API_MAX_PAGE_SIZE:
        messages.append(
            Warning(
                f"ARGUS_API_PAGE_SIZE ({settings.ARGUS_API_PAGE_SIZE}) is above ARGUS_API_MAX_PAGE_SIZE "
                f"({settings.ARGUS_API_MAX_PAGE_SIZE}): pages are cut to the maximum.",
                id="argus.W001",
            )
        )
    return messages
