"""`manage.py create_device_key LOGICAL_ID [--tenant SCHEMA]`: issue a device's HTTP API key, shown once."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from devices.models import Device
from devices.services import api_key_create


class Command(BaseCommand):
    help = "Issue an HTTP API key for a device and print it once (only its hash is stored)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("logical_id", metavar="LOGICAL_ID")
        parser.add_argument("--tenant", metavar="SCHEMA", help="tenant schema (default: from the device registry)")
        parser.add_argument("--expires-days", type=int, metavar="N", help="the key stops working after N days")
        parser.add_argument("--url", default="http://localhost:8000", help="base URL used in the printed curl example")
        parser.add_argument("--quiet", action="store_true", help="print only the key (for scripts)")

    def handle(self, *args: Any, **options: Any) -> None:
        expires = options["expires_days"]
        if expires is not None and expires < 1:
            raise CommandError("--expires-days must be at least 1")
        try:
            api_key, key = api_key_create(
                logical_id=options["logical_id"],
                tenant_schema=options["tenant"],
                expiry_date=timezone.now() + timedelta(days=expires) if expires else None,
            )
        except Device.DoesNotExist as exc:
            raise CommandError(str(exc)) from exc
        if options["quiet"]:
            self.stdout.write(key)
            return
        url = options["url"].rstrip("/") + "/api/v1/telemetry"
        self.stdout.write(
            f"API key for device {api_key.logical_identifier} (tenant {api_key.tenant.schema_name}, "
            f"prefix {api_key.prefix}). It is shown only now; only its hash is stored:\n\n"
            f"    {key}\n\n"
            "Send telemetry with it:\n\n"
            f"    curl -i -X POST {url} \\\n"
            f"      -H 'Authorization: Api-Key {key}' \\\n"
            "      -H 'Content-Type: application/json' \\\n"
            '      -d \'{"values": {"temperature": 21.5}}\'\n'
        )
