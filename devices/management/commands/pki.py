"""`manage.py pki <subcommand>`: the device certificate authority (logic in devices.pki / devices.services)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django_tenants.utils import schema_context

from argus.models import DeviceRegistration
from devices import pki
from devices.models import Device, DeviceCertificate
from devices.services import certificate_crl_publish, certificate_issue, certificate_revoke, passphrase_from_env

PASSPHRASE_ENV = pki.PASSPHRASE_ENV


def _tenant_schema(logical_id: str, tenant: str | None) -> str:
    """Return the schema that owns the device: --tenant, else the platform-wide registry."""
    if tenant:
        return tenant
    registration = DeviceRegistration.objects.select_related("tenant").filter(logical_identifier=logical_id).first()
    if registration is None:
        raise CommandError(f"device {logical_id!r} is not registered in any tenant (pass --tenant SCHEMA)")
    return str(registration.tenant.schema_name)


class Command(BaseCommand):
    help = "Device certificate authority: CA, broker/bridge/device certificates, revocation, Mosquitto config."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")

        p = sub.add_parser("init-ca", help="create the CA key and self-signed certificate")
        self._add_out(p)
        p.add_argument("--common-name", default="Argus Device CA")
        p.add_argument("--days", type=int, default=3650)
        p.add_argument("--force", action="store_true", help="replace an existing CA (invalidates every certificate)")

        p = sub.add_parser("issue-server", help="issue the broker's TLS certificate")
        self._add_out(p)
        p.add_argument("hosts", nargs="+", metavar="HOST", help="DNS names and IP addresses clients connect to")
        p.add_argument("--days", type=int, default=825)

        p = sub.add_parser("issue-client", help="issue a service client certificate (the bridge)")
        self._add_out(p)
        p.add_argument("name", nargs="?", default="argus-bridge", metavar="NAME")
        p.add_argument("--days", type=int, default=825)

        p = sub.add_parser("issue-device", help="issue a device certificate and record it")
        self._add_out(p)
        p.add_argument("logical_id", metavar="LOGICAL_ID")
        p.add_argument("--tenant", metavar="SCHEMA", help="tenant schema (default: from the device registry)")
        p.add_argument("--days", type=int, default=365)

        p = sub.add_parser("revoke", help="revoke a device's certificates and rebuild the CRL")
        self._add_out(p)
        p.add_argument("logical_id", metavar="LOGICAL_ID")
        p.add_argument("--serial", metavar="S", help="revoke only this serial (hex); default: all of the device's")
        p.add_argument("--tenant", metavar="SCHEMA")
        p.add_argument("--reason", default="", help="free text kept with the certificate")
        p.add_argument("--crl-days", type=int, default=None, help="CRL validity (default settings.ARGUS_CRL_DAYS)")

        p = sub.add_parser("crl", help="rebuild crl.pem from the certificate ledger, then run the broker reload hook")
        self._add_out(p)
        p.add_argument(
            "--days", type=int, default=None, help="validity (default ARGUS_CRL_DAYS); rebuild before it runs out"
        )

        p = sub.add_parser("mosquitto-config", help="write the broker's mTLS listener and ACL")
        self._add_out(p)
        p.add_argument("--port", type=int, default=8883)
        p.add_argument("--bind", default="0.0.0.0")  # noqa: S104 - a broker listens on all interfaces
        p.add_argument(
            "--bridge-username",
            action="append",
            default=None,
            metavar="NAME",
            help="CN of a bridge's client certificate (repeat for several bridges; default argus-bridge)",
        )

    @staticmethod
    def _add_out(parser: CommandParser) -> None:
        parser.add_argument(
            "--out", type=Path, default=None, help="PKI directory (default: settings.ARGUS_PKI_DIR / $ARGUS_PKI_DIR)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        out = Path(options["out"] or settings.ARGUS_PKI_DIR)
        handler = getattr(self, "_" + options["subcommand"].replace("-", "_"))
        try:
            handler(out, options)
        except pki.PkiError as exc:
            raise CommandError(str(exc)) from exc

    def _say(self, message: str) -> None:
        self.stdout.write(message)

    def _init_ca(self, out: Path, options: dict[str, Any]) -> None:
        ca = pki.init_ca(
            out,
            common_name=options["common_name"],
            days=options["days"],
            passphrase=passphrase_from_env(),
            force=options["force"],
        )
        self._say(f"CA {ca.subject_cn!r} valid until {ca.not_after:%Y-%m-%d}: {ca.cert_path} (key {ca.key_path})")

    def _issue_server(self, out: Path, options: dict[str, Any]) -> None:
        cert = pki.issue_server(out, options["hosts"], days=options["days"], passphrase=passphrase_from_env())
        self._say(f"server certificate for {', '.join(options['hosts'])}: {cert.cert_path} (key {cert.key_path})")

    def _issue_client(self, out: Path, options: dict[str, Any]) -> None:
        cert = pki.issue_client(out, options["name"], days=options["days"], passphrase=passphrase_from_env())
        self._say(f"client certificate CN={cert.subject_cn}: {cert.cert_path} (key {cert.key_path})")

    def _issue_device(self, out: Path, options: dict[str, Any]) -> None:
        logical_id = options["logical_id"]
        schema = _tenant_schema(logical_id, options["tenant"])
        with schema_context(schema):
            try:
                device = Device.objects.get(logical_identifier=logical_id)
            except Device.DoesNotExist:
                raise CommandError(f"no device {logical_id!r} in tenant {schema!r}") from None
            passphrase = passphrase_from_env()
            record = certificate_issue(device=device, out_dir=out, days=options["days"], passphrase=passphrase)
        device_dir = out / pki.DEVICES_DIR / logical_id
        self._say(f"issued certificate for {logical_id} (tenant {schema})")
        self._say(f"  serial      {record.serial_number}")
        self._say(f"  sha256      {record.fingerprint_sha256}")
        self._say(f"  valid       {record.not_before:%Y-%m-%d %H:%M} .. {record.not_after:%Y-%m-%d %H:%M} UTC")
        self._say(f"  certificate {device_dir / (record.serial_number + '.crt')}")
        self._say(f"  key         {device_dir / (record.serial_number + '.key')}  (give it to the device, then delete)")
        self._say(f"  CA          {out / pki.CA_CERT}")

    def _revoke(self, out: Path, options: dict[str, Any]) -> None:
        logical_id = options["logical_id"]
        schema = _tenant_schema(logical_id, options["tenant"])
        with schema_context(schema):
            try:
                device = Device.objects.get(logical_identifier=logical_id)
                revoked = certificate_revoke(device=device, serial=options["serial"], reason=options["reason"])
            except Device.DoesNotExist:
                raise CommandError(f"no device {logical_id!r} in tenant {schema!r}") from None
            except DeviceCertificate.DoesNotExist as exc:
                raise CommandError(str(exc)) from None
        if not revoked:
            self._say(f"{logical_id}: no unrevoked certificate to revoke")
        for certificate in revoked:
            self._say(f"revoked {logical_id} serial {certificate.serial_number}")
        days = options["crl_days"] or settings.ARGUS_CRL_DAYS
        path, count = certificate_crl_publish(out_dir=out, days=days, passphrase=passphrase_from_env())
        self._say(f"CRL {path} lists {count} serial(s); {self._reload()}")

    def _crl(self, out: Path, options: dict[str, Any]) -> None:
        days = options["days"] or settings.ARGUS_CRL_DAYS
        path, count = certificate_crl_publish(out_dir=out, days=days, passphrase=passphrase_from_env())
        self._say(f"CRL {path} lists {count} serial(s), valid {days} day(s); {self._reload()}")

    @staticmethod
    def _reload() -> str:
        """Run the broker reload hook if one is configured; say what the operator must do."""
        if pki.reload_broker(
            pid_file=settings.ARGUS_BROKER_PID_FILE or None, command=settings.ARGUS_BROKER_RELOAD_COMMAND or None
        ):
            return "broker reloaded"
        return "send the broker SIGHUP to apply it (or set ARGUS_BROKER_PID_FILE / ARGUS_BROKER_RELOAD_COMMAND)"

    def _mosquitto_config(self, out: Path, options: dict[str, Any]) -> None:
        conf = pki.mosquitto_config(
            out,
            port=options["port"],
            bind=options["bind"],
            bridge_username=options["bridge_username"] or ["argus-bridge"],
            passphrase=passphrase_from_env(),
        )
        self._say(f"listener config {conf} and ACL {out.resolve() / pki.ACL_FILE}")
        self._say(
            "include it from mosquitto.conf (with `per_listener_settings true` if it has other listeners); "
            "the broker user must be able to read server.key and acl"
        )
