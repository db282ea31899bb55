"""Request guards of the kernel: the platform admin's host, tenant-scoped login throttling, and the
tenant named in every log line of a request."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse
from django.http.request import split_domain_port
from django_tenants.middleware.main import TenantMainMiddleware

from argus.logs import begin
from argus.outage import close_broken_connection, is_database_error
from argus.problems import database_unavailable, problem_response

log = logging.getLogger(__name__)


class TenantMiddleware(TenantMainMiddleware):
    """django-tenants' host -> tenant routing, which reads the database on every request: while
    the database is unavailable, a 503 problem document with Retry-After instead of a 500 page
    (devices retry; HTTP ingestion must never answer 500)."""

    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        try:
            return super().process_request(request)
        except Exception as exc:
            if not is_database_error(exc):
                raise
            log.warning("database unavailable for %s: %s", request.path, exc)
            close_broken_connection()
            return problem_response(database_unavailable())


def log_context_middleware(
    get_response: Callable[[HttpRequest], HttpResponse],
) -> Callable[[HttpRequest], HttpResponse]:
    """Every line logged while a request is served names its tenant (argus/logs.py)."""

    def middleware(request: HttpRequest) -> HttpResponse:
        begin(tenant=getattr(getattr(request, "tenant", None), "schema_name", None))
        return get_response(request)

    return middleware


class PlatformAdminHostMiddleware:
    """The public site's /admin/ (tenants, domains, the registry, API keys) answers only on the
    hosts in ARGUS_PLATFORM_ADMIN_HOSTS; elsewhere it does not exist (404), so an unknown host
    name pointed at the web server is not a door to the platform admin."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith("/admin/") and _is_public_site(request) and not platform_admin_host(request):
            raise Http404("No platform admin on this host.")
        return self.get_response(request)


def _is_public_site(request: HttpRequest) -> bool:
    # django-tenants routes the public site (a known public domain, or any unknown host) to
    # PUBLIC_SCHEMA_URLCONF; request.tenant is not even set for an unknown host.
    return getattr(request, "urlconf", None) == settings.PUBLIC_SCHEMA_URLCONF


def platform_admin_host(request: HttpRequest) -> bool:
    """Whether the request's host is one the platform admin answers on."""
    allowed = settings.ARGUS_PLATFORM_ADMIN_HOSTS
    if "*" in allowed:
        return True
    domain, _port = split_domain_port(request.get_host())
    return domain in allowed


def tenant_scoped_username(request: HttpRequest, credentials: dict[str, Any]) -> str:
    """The name django-axes counts failed logins under: `<schema>:<username>`, so each tenant's
    `admin` is throttled apart from every other tenant's."""
    username = str(credentials.get("username") or "")
    return f"{getattr(connection, 'schema_name', 'public')}:{username}"
