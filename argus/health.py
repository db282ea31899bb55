"""Readiness checks behind /readyz: each a function returning a CheckResult.

The list that runs is `settings.ARGUS_READINESS_CHECKS` (dotted paths), so an app adds a check
by appending its function there; the kernel stays ignorant of what the apps check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from django.conf import settings
from django.db import DatabaseError, connection
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
    """The configured checks, in order."""
    return [_load(path) for path in settings.ARGUS_READINESS_CHECKS]


def run_checks() -> list[CheckResult]:
    """Run every configured check; a check that raises counts as failed (and is logged)."""
    results = []
    for check in readiness_checks():
        name = getattr(check, "__name__", repr(check)).removesuffix("_check")
        try:
            results.append(check())
        except Exception as exc:
            log.exception("readiness check %s raised", name)
            results.append(CheckResult(name, False, f"check raised {type(exc).__name__}: {exc}"))
    return results


def database_check() -> CheckResult:
    """PostgreSQL answers a query."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as exc:
        log.warning("readiness: database unreachable: %s", exc)
        return CheckResult("database", False, f"unreachable: {exc}".strip())
    return CheckResult("database", True)
