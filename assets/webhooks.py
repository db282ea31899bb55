"""Alert notifications: each tenant's webhooks receive alert opened/acknowledged/resolved as JSON,
signed with HMAC-SHA256, written as an outbox row in the transaction that changed the alert, sent
after commit and retried with backoff until delivered or out of attempts.

A tenant admin chooses the URL, so it is untrusted input: the address is checked when sending
(argus/outbound.py), the connection goes to the address that was checked, and redirects are not
followed. The signature and payload are documented in docs/alerts-and-health.md.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import orjson
import urllib3
from django.conf import settings
from django.utils import timezone

from argus.outbound import OutboundRefused, allowed_addresses
from argus.registry import current_schema
from assets.models import Alert, AlertEvent, DeliveryStatus, WebhookDelivery, WebhookEndpoint

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Argus-Signature"
TIMESTAMP_HEADER = "X-Argus-Timestamp"
EVENT_HEADER = "X-Argus-Event"
DELIVERY_HEADER = "X-Argus-Delivery"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: `sha256=<hex of HMAC-SHA256(secret, "<timestamp>." + body)>`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


@dataclass(frozen=True)
class Attempt:
    """The outcome of one POST."""

    delivered: bool
    status: int | None
    error: str


def post(url: str, body: bytes, headers: dict[str, str]) -> Attempt:
    """POST `body` to `url` at an address that was checked, without following redirects."""
    try:
        host, port, addresses = allowed_addresses(url)
    except OutboundRefused as exc:
        return Attempt(False, None, str(exc))
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    timeout = urllib3.Timeout(
        connect=settings.ARGUS_WEBHOOK_TIMEOUT_SECONDS, read=settings.ARGUS_WEBHOOK_TIMEOUT_SECONDS
    )
    pool: urllib3.HTTPConnectionPool
    if parts.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(
            addresses[0], port, timeout=timeout, server_hostname=host, assert_hostname=host, cert_reqs="CERT_REQUIRED"
        )
    else:
        pool = urllib3.HTTPConnectionPool(addresses[0], port, timeout=timeout)
    headers = {**headers, "Host": parts.netloc.rpartition("@")[2]}
    try:
        response = pool.urlopen(
            "POST", path, body=body, headers=headers, retries=False, redirect=False, preload_content=False
        )
        snippet = response.read(300, decode_content=False)
        response.release_conn()
    except urllib3.exceptions.HTTPError as exc:
        return Attempt(False, None, f"{type(exc).__name__}: {exc}"[:1000])
    finally:
        pool.close()
    if 200 <= response.status < 300:
        return Attempt(True, response.status, "")
    return Attempt(False, response.status, f"HTTP {response.status}: {snippet.decode(errors='replace')}"[:1000])


def alert_payload(alert: Alert, event: str) -> dict[str, Any]:
    """The JSON body of an event (docs/alerts-and-health.md)."""
    rule = alert.rule

    def iso(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "event": event,
        "tenant": current_schema(),
        "alert": {
            "id": alert.pk,
            "status": alert.status,
            "severity": alert.severity,
            "metric": alert.metric,
            "value": alert.value,
            "last_value": alert.last_value,
            "message": alert.message,
            "condition_since": iso(alert.condition_since),
            "raised_at": iso(alert.raised_at),
            "acknowledged_at": iso(alert.acknowledged_at),
            "acknowledged_by": alert.acknowledged_by.get_username() if alert.acknowledged_by else None,
            "resolved_at": iso(alert.resolved_at),
            "resolved_by": alert.resolved_by.get_username() if alert.resolved_by else None,
            "resolution": alert.resolution or None,
            "rule": {"id": rule.pk, "name": rule.name, "condition": rule.describe()},
            "asset": {"id": alert.asset_id, "name": alert.asset.name},
        },
    }


def deliveries_record(*, alert: Alert, event: AlertEvent) -> list[int]:
    """Inside the transaction that changed the alert: one pending delivery per endpoint that
    wants the event. The caller sends them once the transaction commits (assets/tasks.py,
    `send_followups`); one whose task is lost is sent by the retry sweep."""
    endpoints = [e for e in WebhookEndpoint.objects.filter(enabled=True) if event.value in e.events]
    if not endpoints:
        return []
    payload = alert_payload(alert, event.value)
    now = timezone.now()
    created = WebhookDelivery.objects.bulk_create(
        [
            WebhookDelivery(endpoint=e, alert=alert, event=event.value, payload=payload, next_attempt_at=now)
            for e in endpoints
        ]
    )
    return [d.pk for d in created]


def retry_delay(attempts: int) -> timedelta:
    """Backoff after the n-th failed attempt: base * 2^(n-1), capped."""
    base = settings.ARGUS_WEBHOOK_RETRY_BASE_SECONDS
    return timedelta(seconds=min(base * 2 ** max(0, attempts - 1), settings.ARGUS_WEBHOOK_RETRY_MAX_SECONDS))


def delivery_attempt(*, delivery_id: int) -> str | None:
    """Send one pending delivery if it is due and no other worker has claimed it; returns its
    status afterwards (None: not due, or not ours)."""
    lease = timedelta(seconds=settings.ARGUS_WEBHOOK_TIMEOUT_SECONDS * 3 + 5)
    now = timezone.now()
    # Claimed by a conditional UPDATE: a second worker (or the sweep) finds nothing due.
    claimed = WebhookDelivery.objects.filter(
        pk=delivery_id, status=DeliveryStatus.PENDING, next_attempt_at__lte=now
    ).update(next_attempt_at=now + lease, last_attempt_at=now)
    if not claimed:
        return None
    delivery = WebhookDelivery.objects.select_related("endpoint").get(pk=delivery_id)
    body = orjson.dumps(delivery.payload)
    stamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Argus-Webhook/1",
        EVENT_HEADER: delivery.event,
        DELIVERY_HEADER: str(delivery.pk),
        TIMESTAMP_HEADER: str(stamp),
        SIGNATURE_HEADER: sign(delivery.endpoint.secret, stamp, body),
    }
    attempt = post(delivery.endpoint.url, body, headers)
    delivery.attempts += 1
    delivery.response_status = attempt.status
    delivery.last_error = attempt.error
    if attempt.delivered:
        delivery.status = DeliveryStatus.DELIVERED
        delivery.delivered_at = timezone.now()
        delivery.next_attempt_at = None
    elif delivery.attempts >= settings.ARGUS_WEBHOOK_MAX_ATTEMPTS:
        delivery.status = DeliveryStatus.FAILED
        delivery.next_attempt_at = None
        log.warning(
            "webhook delivery failed for good id=%s endpoint=%s attempts=%d: %s",
            delivery.pk,
            delivery.endpoint.name,
            delivery.attempts,
            attempt.error,
        )
    else:
        delivery.next_attempt_at = timezone.now() + retry_delay(delivery.attempts)
        log.info(
            "webhook delivery will be retried id=%s endpoint=%s attempt=%d: %s",
            delivery.pk,
            delivery.endpoint.name,
            delivery.attempts,
            attempt.error,
        )
    delivery.save(
        update_fields=[
            "attempts",
            "response_status",
            "last_error",
            "status",
            "delivered_at",
            "next_attempt_at",
        ]
    )
    return str(delivery.status)


def deliveries_due(*, limit: int = 100) -> int:
    """The retry sweep: attempt every pending delivery that is due (this tenant). Returns how many
    were attempted."""
    ids = list(
        WebhookDelivery.objects.filter(status=DeliveryStatus.PENDING, next_attempt_at__lte=timezone.now())
        .order_by("next_attempt_at")
        .values_list("pk", flat=True)[:limit]
    )
    return sum(1 for delivery_id in ids if delivery_attempt(delivery_id=delivery_id) is not None)
