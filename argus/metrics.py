"""Prometheus metrics of the web processes (requests by route, method and status, and how long
they took) and the registry a /metrics answer is made from.

Under gunicorn each worker is a process with counters of its own, and a scrape reaches one of
them. With PROMETHEUS_MULTIPROC_DIR set every process writes its values to files in that
directory and /metrics adds up all of them: prometheus-client's multiprocess mode. gunicorn.conf.py
sets it for every gunicorn server (web and live), empties it at start and marks exited workers
dead; the Celery worker gets its own (argus/celery_metrics.py). Without the variable a process
reports its own registry (`manage.py runserver`, the tests, runbridge, runingest).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils.module_loading import import_string
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

# Route names (URL pattern names), never raw paths: a path carries ids, so each device would be a
# series of its own. A path that matches no pattern is `unmatched`.
REQUESTS = Counter(
    "argus_web_requests_total",
    "HTTP requests answered, by URL pattern name, method and status",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "argus_web_request_seconds",
    "Time to answer an HTTP request (until the response starts, for streams), by URL pattern name and method",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def multiprocess_dir() -> str:
    """The multiprocess directory of this process, "" when it runs in single-process mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


_web_registry: CollectorRegistry | None = None


def web_registry() -> CollectorRegistry:
    """The collectors of settings.ARGUS_WEB_METRICS_COLLECTORS (dotted paths of Collector classes:
    gauges read from the database at scrape time, e.g. devices.metrics.PresenceCollector), which
    only the web /metrics reports: the apps above the kernel wire them in, it never imports them."""
    global _web_registry
    if _web_registry is None:
        registry = CollectorRegistry(auto_describe=False)
        for path in settings.ARGUS_WEB_METRICS_COLLECTORS:
            registry.register(import_string(path)())
        _web_registry = registry
    return _web_registry


def metrics_registry() -> CollectorRegistry:
    """What /metrics reports: every process's values in multiprocess mode, else this process's."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry
    return REGISTRY


def route_name(request: HttpRequest) -> str:
    """The bounded label of a request: its URL pattern's name (with namespace), or the probe that
    answered it before URL resolution, or `unmatched`."""
    match = request.resolver_match
    if match is not None and match.view_name:
        return match.view_name
    return getattr(request, "argus_route", "unmatched")


def request_metrics_middleware(
    get_response: Callable[[HttpRequest], HttpResponse],
) -> Callable[[HttpRequest], HttpResponse]:
    """Count and time every request; first in MIDDLEWARE, so answers of the probes and of the
    tenant middleware (503 while the database is down) count too."""

    def middleware(request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        response = get_response(request)
        method = request.method if request.method in METHODS else "other"
        route = route_name(request)
        REQUESTS.labels(route, method, str(response.status_code)).inc()
        REQUEST_SECONDS.labels(route, method).observe(time.perf_counter() - started)
        return response

    return middleware
