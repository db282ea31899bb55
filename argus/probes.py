"""The HTTP server of the processes that are not web servers (runbridge, runingest, the Celery
worker): /metrics, /healthz and /readyz on one port, in a daemon thread.

prometheus-client's WSGI app answers /metrics; /healthz says the process is alive (it answers,
nothing more); /readyz runs the process's own checks (argus/health.py) and answers 503 when one
fails. It binds ARGUS_WORKER_METRICS_ADDR: loopback by default, 0.0.0.0 inside the compose
network, where Prometheus and Docker's health checks reach it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from django.conf import settings
from prometheus_client import make_wsgi_app

from argus.health import CheckResult, readiness_body
from argus.metrics import metrics_registry

log = logging.getLogger(__name__)

Readiness = Callable[[], list[CheckResult]]
StartResponse = Callable[..., Any]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # A scrape or probe that hangs must not hold up the next one, nor the process's exit.
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # A line per scrape and probe (every few seconds) would drown the process's own log.
        pass


def probe_app(readiness: Readiness) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """The WSGI app: /healthz, /readyz (from `readiness`), anything else is prometheus-client's."""
    metrics_app = make_wsgi_app(metrics_registry())

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _json(start_response, 200, {"status": "ok"})
        if path == "/readyz":
            ready, body = readiness_body(readiness())
            return _json(start_response, 200 if ready else 503, body)
        return metrics_app(environ, start_response)

    return app


def _json(start_response: StartResponse, status: int, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    reason = {200: "OK", 503: "Service Unavailable"}[status]
    start_response(f"{status} {reason}", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


class ProbeServer:
    """/metrics, /healthz and /readyz of this process on `port` (0: a free one), until `stop()`."""

    def __init__(self, port: int, readiness: Readiness, *, addr: str | None = None) -> None:
        self.addr = settings.ARGUS_WORKER_METRICS_ADDR if addr is None else addr
        self._server = make_server(
            self.addr, port, probe_app(readiness), server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="probe-server", daemon=True)

    def start(self) -> ProbeServer:
        self._thread.start()
        log.info("probe server listening on %s:%d (/metrics /healthz /readyz)", self.addr, self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
