"""Operational views."""

import hmac
import ipaddress
from collections.abc import Callable

from django.conf import settings
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views.defaults import page_not_found
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from rest_framework import exceptions

from argus.health import run_checks
from argus.problems import problem_response


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness and database reachability."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: every check of settings.ARGUS_READINESS_CHECKS; 503 when one fails."""
    results = run_checks()
    ready = all(result.ok is not False for result in results)
    body = {
        "status": "ok" if ready else "fail",
        "checks": [{"name": r.name, "status": r.status, "detail": r.detail} for r in results],
    }
    return JsonResponse(body, status=200 if ready else 503)


def probe_middleware(get_response: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    """Answer /readyz before the tenant middleware: on any host, and with a 503 body (not an
    error page) when the database that the tenant lookup needs is down."""

    def middleware(request: HttpRequest) -> HttpResponse:
        if request.path_info == "/readyz":
            return readyz(request)
        return get_response(request)

    return middleware


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics of this web process: for the bearer of ARGUS_METRICS_TOKEN, or, when no
    token is configured, for loopback clients only (404 to everyone else: not even its existence
    is public)."""
    if not metrics_allowed(request):
        raise Http404("No metrics here.")
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


def metrics_allowed(request: HttpRequest) -> bool:
    """Whether this request may read /metrics."""
    token = settings.ARGUS_METRICS_TOKEN
    if token:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())
    try:
        return ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        return False


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """handler404: a path under /api/ that names no route gets a problem document like every
    other API error (an id of the wrong shape, say); elsewhere, Django's page."""
    if request.path.startswith("/api/"):
        return problem_response(exceptions.NotFound())
    return page_not_found(request, exception)
