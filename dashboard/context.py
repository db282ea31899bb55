"""The dashboard's address for the admin's header (a context processor)."""

from __future__ import annotations

from django.conf import settings
from django.db import connection
from django.http import HttpRequest
from django.http.request import split_domain_port
from django_tenants.utils import get_public_schema_name


def dashboard_url(request: HttpRequest) -> str:
    """Where this tenant's dashboard is: this server's /dashboard/, or the same host on
    ARGUS_DASHBOARD_PORT when the ASGI server that streams its events listens elsewhere."""
    port = settings.ARGUS_DASHBOARD_PORT
    if not port:
        return "/dashboard/"
    domain, _ = split_domain_port(request.get_host())
    return f"{request.scheme}://{domain}:{port}/dashboard/"


def dashboard_link(request: HttpRequest) -> dict[str, str]:
    if getattr(connection, "schema_name", get_public_schema_name()) == get_public_schema_name():
        return {}
    return {"dashboard_url": dashboard_url(request)}
