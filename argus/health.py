"""Readiness checks behind /readyz: each a function returning a CheckResult, each bounded in time.

The list the web's /readyz runs is `settings.ARGUS_READINESS_CHECKS` (dotted paths), so an app
adds a check by appending its function there; the kernel stays ignorant of what the apps check.
runbridge, runingest and the Celery worker run their own lists on their probe port
(argus/probes.py) through the same `run_checks`.

Every check runs in its own daemon thread and gets ARGUS_READY_CHECK_TIMEOUT_SECONDS to answer;
one that has not answered by then counts as failed. A server that is stopped (SIGSTOP) rather
than gone accepts TCP connections and then never answers: connect timeouts catch most of that,
the thread's deadline catches the rest, so a probe never hangs on a dependency. The checks open
their own short-lived connections (never Django's per-thread one), so a thread left waiting on a
frozen server holds nothing the process needs and ends when the server answers or goes away.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import psycopg
import redis
from django.conf import settings
from django.utils.module_loading import import_string

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict; `ok=None` means it does not apply here (not configured)."""

    name: str
    ok: bool | None
    detail: str = ""

    @property
    def status(self) -> str:
        return {True: "ok", False: "fail", None: "skipped"}[self.ok]


Check = Callable[[], CheckResult]


@cache
def _load(path: str) -> Check:
    check: Check = import_string(path)
    return check


def readiness_checks() -> list[Check]:
    """The configured checks of the web's /readyz, in order."""
    return [_load(path) for path in settings.ARGUS_READINESS_CHECKS]


def check_timeout() -> float:
    """Seconds each check may take (ARGUS_READY_CHECK_TIMEOUT_SECONDS)."""
    return float(settings.ARGUS_READY_CHECK_TIMEOUT_SECONDS)


def check_name(check: Check) -> str:
    """`database` for `database_check`, `_mqtt_check` and so on."""
    return str(getattr(check, "__name__", repr(check))).removesuffix("_check").lstrip("_")


def run_checks(checks: Sequence[Check] | None = None, *, timeout: float | None = None) -> list[CheckResult]:
    """Run checks (the configured ones by default) concurrently, in order of the list; one that
    raises or has not answered within `timeout` seconds counts as failed (and is logged)."""
    checks = readiness_checks() if checks is None else list(checks)
    timeout = check_timeout() if timeout is None else timeout
    results: list[CheckResult | None] = [None] * len(checks)

    def run(index: int, check: Check) -> None:
        try:
            results[index] = check()
        except Exception as exc:
            log.exception("readiness check %s raised", check_name(check))
            results[index] = CheckResult(check_name(check), False, f"check raised {type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=run, args=(i, check), name=f"readiness-{check_name(check)}", daemon=True)
        for i, check in enumerate(checks)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    answered = []
    for check, result in zip(checks, results, strict=True):
        if result is None:
            log.warning("readiness check %s gave no answer within %.1f s", check_name(check), timeout)
            result = CheckResult(check_name(check), False, f"no answer within {timeout:g} s")
        answered.append(result)
    return answered


def readiness_body(results: list[CheckResult]) -> tuple[bool, dict[str, Any]]:
    """(ready, the JSON body every /readyz answers with)."""
    ready = all(result.ok is not False for result in results)
    return ready, {
        "status": "ok" if ready else "fail",
        "checks": [{"name": r.name, "status": r.status, "detail": r.detail} for r in results],
    }


def _connect_timeout() -> int:
    # libpq and redis-py take whole seconds / floats; libpq's minimum useful value is 2 s
    # (it treats 1 as 2), which is why the thread's deadline, not this, is the real bound.
    return max(1, math.ceil(check_timeout()))


def database_check() -> CheckResult:
    """PostgreSQL accepts a new connection and answers a query."""
    db: dict[str, Any] = settings.DATABASES["default"]
    try:
        with psycopg.connect(
            dbname=str(db["NAME"]),
            user=db.get("USER") or None,
            password=db.get("PASSWORD") or None,
            host=db.get("HOST") or None,
            port=db.get("PORT") or None,
            connect_timeout=_connect_timeout(),
            application_name="argus-readyz",
        ) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        log.warning("readiness: database unreachable: %s", exc)
        return CheckResult("database", False, f"unreachable: {exc}".strip())
    return CheckResult("database", True)


def redis_check() -> CheckResult:
    """Redis (the cache, and the Celery broker when that is another server) answers PING."""
    urls = dict.fromkeys([settings.CACHES["default"]["LOCATION"], settings.CELERY_BROKER_URL])
    timeout = check_timeout()
    for url in urls:
        if not str(url).startswith(("redis://", "rediss://", "unix://")):
            continue
        client = redis.Redis.from_url(str(url), socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            client.ping()
        except (redis.RedisError, OSError) as exc:
            log.warning("readiness: redis unreachable: %s", exc)
            return CheckResult("redis", False, f"unreachable: {exc}".strip())
        finally:
            client.close()
    return CheckResult("redis", True)
