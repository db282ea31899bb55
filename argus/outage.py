"""Outages of a service a worker depends on (the database): telling them from a message's own
faults, backing off, and saying once when one starts and once when it ends.

An infrastructure error (the server unreachable, the connection lost, an administrator's
shutdown, a full disk) says nothing about the message in hand: the worker keeps the message,
waits and tries again, and never counts the attempt toward its delivery limit.
"""

from __future__ import annotations

import logging
import threading
import time

import django.db
import psycopg
from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

# psycopg's OperationalError covers connection failures, AdminShutdown, DiskFull, statement
# timeouts and serialization failures; Django wraps them, except around raw COPY, which
# psycopg raises directly.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    django.db.OperationalError,
    django.db.InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)

SERVICE_UP = Gauge("argus_dependency_up", "0 while a service this process needs is unavailable", ["service"])
OUTAGES = Counter("argus_dependency_outages_total", "Outages of a service this process needs", ["service"])
RETRIES = Counter("argus_dependency_retries_total", "Attempts that failed during an outage", ["service"])

# Backoff between tries: doubling from the first, never more than the last.
FIRST_DELAY = 0.2
MAX_DELAY = 5.0


def is_database_error(exc: BaseException) -> bool:
    """Whether exc (or what it wraps) is the database failing, not the data it was given."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 5:
        if isinstance(current, DATABASE_ERRORS):
            return True
        current = current.__cause__
        seen += 1
    return False


class Outage:
    """The state of one service as this process sees it; one instance per service (`outage()`)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.active = False
        self.started = 0.0
        self.retries = 0
        self._lock = threading.Lock()
        SERVICE_UP.labels(service).set(1)

    def failed(self, exc: BaseException) -> float:
        """Record a failed attempt; returns how long to wait before the next one."""
        with self._lock:
            if not self.active:
                self.active = True
                self.started = time.monotonic()
                self.retries = 0
                SERVICE_UP.labels(self.service).set(0)
                OUTAGES.labels(self.service).inc()
                log.warning(
                    "%s outage started, pausing and retrying (at most %.0f s apart): %s: %s",
                    self.service,
                    MAX_DELAY,
                    type(exc).__name__,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                )
            self.retries += 1
            RETRIES.labels(self.service).inc()
            return min(MAX_DELAY, FIRST_DELAY * 2 ** (self.retries - 1))

    def recovered(self) -> None:
        """Record a successful attempt (cheap when there is no outage)."""
        if not self.active:
            return
        with self._lock:
            if not self.active:
                return
            self.active = False
            SERVICE_UP.labels(self.service).set(1)
            log.info(
                "%s outage ended after %.1f s (%d failed attempts)",
                self.service,
                time.monotonic() - self.started,
                self.retries,
            )


_outages: dict[str, Outage] = {}
_outages_lock = threading.Lock()


def outage(service: str) -> Outage:
    """This process's tracker of the given service (shared by everything that uses it)."""
    with _outages_lock:
        if service not in _outages:
            _outages[service] = Outage(service)
        return _outages[service]


def database_outage() -> Outage:
    """This process's tracker of the database."""
    return outage("database")


def close_broken_connection() -> None:
    """Drop this thread's database connection after an infrastructure error, so the next attempt
    opens a new one instead of reusing a dead socket."""
    try:
        django.db.connection.close()
    except DATABASE_ERRORS:
        # Closing a connection the server already dropped can itself fail; it is gone either way.
        log.debug("closing a broken database connection failed", exc_info=True)
