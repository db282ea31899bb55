"""`manage.py seed_iot`: the demo tenant with its device types, devices, assets and rules."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from assets.seeding import DEFAULT_FIXTURE, seed_iot


class Command(BaseCommand):
    help = "Create the demo tenant and its IoT data (idempotent: a second run changes nothing)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE)

    def handle(self, *args: Any, **options: Any) -> None:
        password = os.environ.get("ARGUS_ADMIN_PASSWORD") or admin_password_default()
        report = seed_iot(fixture_path=options["fixture"], admin_password=password)
        if report.created:
            for line in report.created:
                self.stdout.write(f"created {line}")
        else:
            self.stdout.write("Nothing to do: the demo data is already there.")
        port = os.environ.get("ARGUS_WEB_PORT", "8000")
        self.stdout.write(self.style.SUCCESS(f"Tenant '{report.schema_name}' ready."))
        for domain in report.domains:
            self.stdout.write(f"  admin: http://{domain}:{port}/admin/")
        if report.admin_password:
            self.stdout.write(f"  log in as {report.admin_username} / {report.admin_password}")
        else:
            self.stdout.write(f"  log in as {report.admin_username} (password unchanged)")


def admin_password_default() -> str:
    """The tenant admin's password when ARGUS_ADMIN_PASSWORD is not set: the well-known demo one
    only in DEBUG (make demo), a random one, printed once, anywhere else."""
    if settings.DEBUG:
        return "argus-demo-admin"
    return secrets.token_urlsafe(18)
