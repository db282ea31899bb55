"""`manage.py provision FILE --schema TENANT`: devices of one tenant from a CSV or JSON file
(assets/provisioning.py), with a report per row; optionally a certificate bundle and an API key
for each device written."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django_tenants.utils import get_tenant_model, schema_context

from assets.provisioning import ProvisionFileError, devices_provision, outcome_lines, read_rows
from devices import pki
from devices.models import Device
from devices.services import api_key_create, certificate_issue, passphrase_from_env


class Command(BaseCommand):
    help = "Create or update a tenant's devices from a CSV or JSON file; every row is validated first."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", metavar="FILE", help="CSV (header: logical_identifier,name,device_type,…) or JSON")
        parser.add_argument("--schema", required=True, metavar="TENANT", help="the tenant's schema name")
        parser.add_argument("--format", choices=["csv", "json"], help="default: from the file name's extension")
        parser.add_argument("--all-or-nothing", action="store_true", help="write nothing when any row is refused")
        parser.add_argument("--dry-run", action="store_true", help="validate and report; write nothing")
        parser.add_argument(
            "--issue-certificates", metavar="DIR", help="write each device's certificate, key and the CA to DIR/<id>/"
        )
        parser.add_argument("--certificate-days", type=int, default=365, metavar="N")
        parser.add_argument("--api-keys", action="store_true", help="issue an HTTP API key per device, printed once")
        parser.add_argument("--api-key-days", type=int, metavar="N", help="the keys stop working after N days")

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(options["file"])
        fmt = options["format"] or path.suffix.lower().lstrip(".")
        if not get_tenant_model().objects.filter(schema_name=options["schema"]).exists():
            raise CommandError(f"no tenant with schema {options['schema']!r}")
        try:
            rows = read_rows(path.read_bytes(), fmt=fmt)
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}") from exc
        except ProvisionFileError as exc:
            raise CommandError(f"{path}: {exc}") from exc
        with schema_context(options["schema"]):
            report = devices_provision(rows=rows, all_or_nothing=options["all_or_nothing"], dry_run=options["dry_run"])
            for line in outcome_lines(report.outcomes):
                self.stdout.write(line)
            devices = [o.device for o in report.outcomes if o.device is not None and o.action != "refused"]
            if report.written and options["issue_certificates"]:
                self._certificates(devices, Path(options["issue_certificates"]), options["certificate_days"])
            if report.written and options["api_keys"]:
                self._api_keys(devices, options["schema"], options["api_key_days"])
        self.stdout.write(report.summary())
        if report.refused:
            raise CommandError(f"{len(report.refused)} row(s) refused (see above)", returncode=1)

    def _certificates(self, devices: list[Device], out: Path, days: int) -> None:
        """Issue and record a certificate per device; its key leaves the CA's directory for DIR."""
        out.mkdir(parents=True, exist_ok=True)
        pki_dir = settings.ARGUS_PKI_DIR
        passphrase = passphrase_from_env()
        issued_count = 0
        for device in devices:
            try:
                cert = certificate_issue(device=device, out_dir=pki_dir, days=days, passphrase=passphrase)
            except pki.PkiError as exc:
                self.stderr.write(f"{device.logical_identifier}: no certificate: {exc}")
                continue
            issued = pki_dir / pki.DEVICES_DIR / device.logical_identifier
            bundle = out / device.logical_identifier
            bundle.mkdir(mode=0o700, exist_ok=True)
            shutil.copyfile(issued / f"{cert.serial_number}.crt", bundle / "device.crt")
            shutil.move(issued / f"{cert.serial_number}.key", bundle / "device.key")
            shutil.copyfile(pki_dir / pki.CA_CERT, bundle / "ca.crt")
            issued_count += 1
        self.stdout.write(f"certificates: {issued_count} bundles in {out}/<id>/ (device.crt, device.key, ca.crt)")

    def _api_keys(self, devices: list[Device], schema: str, days: int | None) -> None:
        expiry = timezone.now() + timedelta(days=days) if days else None
        self.stdout.write("API keys (shown only now; only their hashes are stored):")
        for device in devices:
            _, key = api_key_create(logical_id=device.logical_identifier, tenant_schema=schema, expiry_date=expiry)
            self.stdout.write(f"{device.logical_identifier}\t{key}")
