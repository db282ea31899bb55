"""Outbound HTTP to addresses a tenant chose (webhooks): only public addresses, unless
ARGUS_WEBHOOK_ALLOWED_NETWORKS names others.

A URL typed by a tenant admin must not become a way into the platform's own network: PostgreSQL,
Redis and NATS on loopback, the cluster's private addresses, a cloud metadata service at
169.254.169.254. The check is on every address the host name resolves to, made at the moment of
sending, and the caller connects to an address that was checked (a second lookup could answer
differently: DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class OutboundRefused(Exception):
    """The URL may not be called (scheme, unresolvable host, or an address that is not allowed)."""


def address_allowed(address: IPAddress) -> bool:
    """A public address, or one inside ARGUS_WEBHOOK_ALLOWED_NETWORKS."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in settings.ARGUS_WEBHOOK_ALLOWED_NETWORKS):
        return True
    return address.is_global and not address.is_multicast


def allowed_addresses(url: str) -> tuple[str, int, list[str]]:
    """(host, port, addresses to connect to) for a URL, or OutboundRefused saying why."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise OutboundRefused("Only http and https URLs.")
    if parts.username or parts.password:
        raise OutboundRefused("No credentials in the URL; the signature authenticates Argus.")
    host = parts.hostname
    if not host:
        raise OutboundRefused("The URL has no host.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise OutboundRefused(f"Bad port: {exc}.") from exc
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise OutboundRefused(f"{host} does not resolve: {exc}.") from exc
    addresses = sorted({str(info[4][0]) for info in infos})
    refused = [a for a in addresses if not address_allowed(ipaddress.ip_address(a))]
    if refused:
        raise OutboundRefused(
            f"{host} resolves to {', '.join(refused)}: private, loopback and link-local addresses are refused "
            "(ARGUS_WEBHOOK_ALLOWED_NETWORKS lists networks to allow)."
        )
    return host, port, addresses


def url_errors(url: str) -> str | None:
    """Why a webhook URL would be refused, for the admin; None if it would be called."""
    try:
        allowed_addresses(url)
    except OutboundRefused as exc:
        return str(exc)
    return None
