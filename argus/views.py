"""Operational views: liveness, readiness and metrics of a web process, and the 404 handler.

/healthz, /readyz and /metrics are answered by `probe_middleware`, ahead of the tenant middleware:
on any host name, and without the tenant lookup's database query (see docs/operations.md)."""

import hmac
import ipaddress
from collections.abc import Callable

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views.defaults import page_not_found
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from rest_framework import exceptions

from argus.health import readiness_body, run_checks
from argus.metrics import metrics_registry, web_registry
from argus.problems import problem_response


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process answers. No dependency is consulted, so an outage of the database or
    of NATS never gets a healthy web process restarted (that is /readyz's business)."""
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: every check of settings.ARGUS_READINESS_CHECKS; 503 when one fails."""
    ready, body = readiness_body(run_checks())
    return JsonResponse(body, status=200 if ready else 503)


def probe_middleware(get_response: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    """Answer /healthz, /readyz and /metrics before the tenant middleware: on any host, and with
    an answer of their own (not an error page) while the database the tenant lookup needs is down."""

    def middleware(request: HttpRequest) -> HttpResponse:
        probe = PROBES.get(request.path_info)
        if probe is not None:
            # What the request metrics (argus/metrics.py) label it with: no URL pattern matched it.
            request.argus_route = probe.__name__  # type: ignore[attr-defined]
            return probe(request)
        return get_response(request)

    return middleware


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics of this web process: for the bearer of ARGUS_METRICS_TOKEN, or, when no
    token is configured, for loopback clients only (404 to everyone else: not even its existence
    is public)."""
    if not metrics_allowed(request):
        raise Http404("No metrics here.")
    body = generate_latest(metrics_registry()) + generate_latest(web_registry())
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)


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


PROBES: dict[str, Callable[[HttpRequest], HttpResponse]] = {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """handler404: a path under /api/ that names no route gets a problem document like every
    other API error (an id of the wrong shape, say); elsewhere, Django's page."""
    if request.path.startswith("/api/"):
        return problem_response(exceptions.NotFound())
    return page_not_found(request, exception)
