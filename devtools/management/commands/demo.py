"""`manage.py demo`: what `make demo` runs once the services answer (orchestration in devtools.demo)."""

from __future__ import annotations

import os
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from devtools.demo import Demo
from devtools.supervisor import ChildError


class Command(BaseCommand):
    help = (
        "Migrate every schema, seed tenant 'demo', start every process of the platform (web, runbridge, "
        "runingest, celery worker and beat), feed it simulated devices of all three processing modes and "
        "report what arrived. DEMO_SECONDS=N stops after N seconds of traffic and exits 0 only if the data "
        "arrived; without it the demo runs until Ctrl-C."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        raw_seconds = os.environ.get("DEMO_SECONDS", "").strip()
        try:
            seconds = float(raw_seconds) if raw_seconds else None
        except ValueError as exc:
            raise CommandError(f"DEMO_SECONDS must be a number of seconds, not {raw_seconds!r}") from exc
        call_command("migrate_schemas", interactive=False, verbosity=0)
        self.stdout.write("Database migrated (public and every tenant schema).")
        call_command("seed_iot")
        try:
            code = Demo(self.stdout, seconds=seconds).run()
        except ChildError as exc:
            raise CommandError(str(exc)) from exc
        if code:
            raise SystemExit(code)
