"""`manage.py demo`: what `make demo` runs once the services answer."""

from __future__ import annotations

import os
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Migrate every schema, seed the demo tenant and show where to log in."

    def handle(self, *args: Any, **options: Any) -> None:
        call_command("migrate_schemas", interactive=False, verbosity=0)
        self.stdout.write("Database migrated (public and every tenant schema).")
        call_command("seed_iot")
        port = os.environ.get("ARGUS_WEB_PORT", "8000")
        self.stdout.write(
            f"\nStart the web process with `.venv/bin/python manage.py runserver {port}` and open "
            f"http://localhost:{port}/admin/ (tenant 'demo')."
        )
