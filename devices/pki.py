"""Argus device certificate authority: CA, broker, bridge and device certificates, CRL, Mosquitto TLS config.

Pure functions over a directory of PEM files, built on `cryptography`; nothing here imports
Django so it can be used and tested on its own. Layout of the directory:

    ca.key, ca.crt                          the CA (key 0600, optionally passphrase-encrypted)
    server.key, server.crt                  the broker's TLS certificate
    clients/<name>.key, clients/<name>.crt  service clients such as the bridge
    devices/<logical_id>/<serial>.key/.crt  device certificates; a device may hold several
    crl.pem                                 revocation list read by the broker
    mosquitto-tls.conf, acl                 broker listener block and topic ACL
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from argus.identity import is_reserved_identifier

log = logging.getLogger(__name__)

# The CA key's passphrase is read from this variable, never from a command line (ps shows those).
PASSPHRASE_ENV = "ARGUS_PKI_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "server.key"
SERVER_CERT = "server.crt"
CRL_FILE = "crl.pem"
MOSQUITTO_CONF = "mosquitto-tls.conf"
ACL_FILE = "acl"
CLIENTS_DIR = "clients"
DEVICES_DIR = "devices"

# Certificates start slightly in the past so a device or broker whose clock is a little behind
# ours does not reject a certificate issued a moment ago.
CLOCK_SKEW = timedelta(minutes=5)

# The CN becomes the MQTT username and a path component: no MQTT wildcards or separators
# (Mosquitto refuses %u patterns for usernames containing + or #), and X.509 caps a CN at 64.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")


class PkiError(Exception):
    """A PKI operation could not be carried out (missing CA, bad passphrase, bad name, ...)."""


class CertificateVerificationError(PkiError):
    """A certificate is not one this CA issued, or is not valid now."""


@dataclass(frozen=True)
class CertBundle:
    """A certificate and its private key as written to disk."""

    cert_path: Path
    key_path: Path
    serial: str
    fingerprint_sha256: str
    subject_cn: str
    not_before: datetime
    not_after: datetime
    pem: str

    @classmethod
    def from_certificate(cls, cert: x509.Certificate, cert_path: Path, key_path: Path) -> Self:
        """Describe a certificate already written at cert_path/key_path."""
        return cls(
            cert_path=cert_path,
            key_path=key_path,
            serial=serial_hex(cert),
            fingerprint_sha256=fingerprint(cert),
            subject_cn=common_name(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        )


@dataclass(frozen=True)
class IssuedCert(CertBundle):
    """A device certificate: CN is the device's logical_id; stored as DeviceCertificate."""


# --------------------------------------------------------------------------- helpers


def serial_hex(cert: x509.Certificate) -> str:
    """Return the certificate serial as lowercase hex without leading zeros."""
    return format(cert.serial_number, "x")


def normalize_serial(serial: str) -> str:
    """Return a hex serial (any case, optional 0x/colons) in the form serial_hex() produces."""
    cleaned = serial.strip().lower().removeprefix("0x").replace(":", "")
    try:
        return format(int(cleaned, 16), "x")
    except ValueError:
        raise PkiError(f"not a hexadecimal serial number: {serial!r}") from None


def fingerprint(cert: x509.Certificate) -> str:
    """Return the SHA-256 fingerprint of the DER certificate as lowercase hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def common_name(cert: x509.Certificate) -> str:
    """Return the subject CN of a certificate ('' if it has none)."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return ""
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8")


def load_certificate(pem: str | bytes) -> x509.Certificate:
    """Parse one PEM certificate."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate: {exc}") from exc


def validate_name(name: str) -> str:
    """Return name if it is usable as a certificate CN, MQTT username and file name, else raise."""
    if not _NAME_RE.fullmatch(name):
        raise PkiError(
            f"invalid name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ : @ -, starting with a letter or digit"
        )
    return name


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write data to path via a temp file and rename, so readers (the broker) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp creates 0600; chmod before writing so a key is never briefly wider.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> None:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    _write_atomic(path, data, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def load_ca(out_dir: Path, passphrase: bytes | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the CA certificate and private key from out_dir."""
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    if not cert_path.exists() or not key_path.exists():
        raise PkiError(f"no CA in {out_dir}: run init-ca first")
    cert = load_certificate(cert_path.read_bytes())
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=passphrase or None)
    except TypeError as exc:
        # cryptography raises TypeError both for "encrypted but no passphrase" and the reverse.
        raise PkiError(f"CA key {key_path}: {exc} (set the CA passphrase)") from exc
    except ValueError as exc:
        raise PkiError(f"CA key {key_path} could not be decrypted: wrong passphrase?") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"CA key {key_path} is not an EC key")
    return cert, key


def load_ca_certificate(out_dir: Path) -> x509.Certificate:
    """Load only the CA certificate (no passphrase needed)."""
    path = Path(out_dir) / CA_CERT
    if not path.exists():
        raise PkiError(f"no CA in {out_dir}: run init-ca first")
    return load_certificate(path.read_bytes())


# --------------------------------------------------------------------------- CA


def init_ca(
    out_dir: Path,
    *,
    common_name: str = "Argus Device CA",
    days: int = 3650,
    passphrase: bytes | None = None,
    force: bool = False,
) -> CertBundle:
    """Create the CA: an EC P-256 key and a self-signed certificate in out_dir."""
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    if not force and (cert_path.exists() or key_path.exists()):
        # Replacing the CA silently would orphan every certificate devices already hold.
        raise PkiError(f"a CA already exists in {out_dir}; refusing to overwrite it without force")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _utcnow()
    subject = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key, passphrase)
    _write_cert(cert_path, cert)
    return CertBundle.from_certificate(cert, cert_path, key_path)


# --------------------------------------------------------------------------- leaf certificates


def _issue_leaf(
    out_dir: Path,
    *,
    cn: str,
    eku: x509.ObjectIdentifier,
    days: int,
    passphrase: bytes | None,
    sans: list[x509.GeneralName] | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Sign a fresh EC P-256 end-entity key with the CA; the caller decides where to write it."""
    ca_cert, ca_key = load_ca(out_dir, passphrase)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _utcnow()
    start = not_before or (now - CLOCK_SKEW)
    end = not_after or (now + timedelta(days=days))
    if end <= start:
        raise PkiError("not_after must be later than not_before")
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # EC keys sign (ECDSA, ECDHE); keyEncipherment is an RSA-only usage.
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert, key


def _san(host: str) -> x509.GeneralName:
    """Return an IP SAN for an address literal and a DNS SAN otherwise (TLS clients check them apart)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_server(
    out_dir: Path,
    hosts: list[str],
    *,
    days: int = 825,
    passphrase: bytes | None = None,
) -> CertBundle:
    """Issue the broker's TLS server certificate for the given host names and IP addresses."""
    if not hosts:
        raise PkiError("at least one host name or IP address is required")
    out_dir = Path(out_dir)
    cert, key = _issue_leaf(
        out_dir,
        cn=hosts[0],
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        days=days,
        passphrase=passphrase,
        sans=[_san(h) for h in dict.fromkeys(hosts)],
    )
    cert_path, key_path = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    # The broker reads this key unattended, so it is never passphrase-encrypted.
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return CertBundle.from_certificate(cert, cert_path, key_path)


def issue_client(
    out_dir: Path,
    name: str,
    *,
    days: int = 825,
    passphrase: bytes | None = None,
) -> CertBundle:
    """Issue a client certificate for a platform service (e.g. CN argus-bridge) under clients/."""
    validate_name(name)
    out_dir = Path(out_dir)
    if (out_dir / DEVICES_DIR / name).exists():
        # CN is the broker username: a service sharing a device's name would get its topic rights.
        raise PkiError(f"{name!r} is already a device identity")
    cert, key = _issue_leaf(
        out_dir,
        cn=name,
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        days=days,
        passphrase=passphrase,
    )
    cert_path, key_path = out_dir / CLIENTS_DIR / f"{name}.crt", out_dir / CLIENTS_DIR / f"{name}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return CertBundle.from_certificate(cert, cert_path, key_path)


def issue_device(
    out_dir: Path,
    logical_id: str,
    *,
    days: int,
    passphrase: bytes | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> IssuedCert:
    """Issue a device client certificate with CN = logical_id; not_before/not_after override the window."""
    validate_name(logical_id)
    out_dir = Path(out_dir)
    if (out_dir / CLIENTS_DIR / f"{logical_id}.crt").exists():
        raise PkiError(f"{logical_id!r} is already a service client identity")
    if is_reserved_identifier(logical_id):
        # Its CN would be a service's MQTT username and client id (see argus/identity.py).
        raise PkiError(f"{logical_id!r} is reserved for a platform service")
    cert, key = _issue_leaf(
        out_dir,
        cn=logical_id,
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        days=days,
        passphrase=passphrase,
        not_before=not_before,
        not_after=not_after,
    )
    # One file pair per serial: during rotation the device holds the old and new certificate.
    device_dir = out_dir / DEVICES_DIR / logical_id
    serial = serial_hex(cert)
    cert_path, key_path = device_dir / f"{serial}.crt", device_dir / f"{serial}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return IssuedCert.from_certificate(cert, cert_path, key_path)


# --------------------------------------------------------------------------- revocation


def build_crl(
    out_dir: Path,
    revoked: Iterable[tuple[str, datetime]],
    *,
    days: int = 7,
    passphrase: bytes | None = None,
    last_update: datetime | None = None,
) -> Path:
    """Write out_dir/crl.pem listing the given (serial hex, revoked at) pairs, signed by the CA.

    last_update (default now) backdates the list, which tests use to produce an expired CRL.
    """
    out_dir = Path(out_dir)
    ca_cert, ca_key = load_ca(out_dir, passphrase)
    now = last_update or _utcnow()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        # OpenSSL rejects every client once next_update passes, so the CRL must be rebuilt
        # (and the broker sent SIGHUP) well before `days` runs out.
        .next_update(now + timedelta(days=days))
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        # Monotonic CRL number so relying parties can tell a newer list from an older one.
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
    )
    seen: set[int] = set()
    for serial, revoked_at in revoked:
        number = int(normalize_serial(serial), 16)
        if number in seen:
            continue
        seen.add(number)
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(number)
            .revocation_date(revoked_at.astimezone(UTC) if revoked_at.tzinfo else revoked_at.replace(tzinfo=UTC))
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    path = out_dir / CRL_FILE
    _write_atomic(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return path


def load_crl(path: Path) -> x509.CertificateRevocationList:
    """Parse a PEM CRL file."""
    return x509.load_pem_x509_crl(Path(path).read_bytes())


# --------------------------------------------------------------------------- verification


def verify_device_certificate(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    *,
    at: datetime | None = None,
) -> None:
    """Raise CertificateVerificationError unless cert is a client certificate ca_cert issued, valid at `at`."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError) as exc:
        raise CertificateVerificationError(
            f"certificate was not issued by {ca_cert.subject.rfc4514_string()}: {exc}"
        ) from exc
    except InvalidSignature as exc:
        raise CertificateVerificationError("certificate signature does not verify against the CA key") from exc
    moment = at or _utcnow()
    if moment < cert.not_valid_before_utc:
        raise CertificateVerificationError(f"certificate is not valid before {cert.not_valid_before_utc.isoformat()}")
    if moment > cert.not_valid_after_utc:
        raise CertificateVerificationError(f"certificate expired at {cert.not_valid_after_utc.isoformat()}")
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise CertificateVerificationError(f"certificate lacks a required extension: {exc}") from exc
    if basic.ca:
        raise CertificateVerificationError("a CA certificate cannot authenticate a device")
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CertificateVerificationError("certificate is not a client (device) certificate")
    if not common_name(cert):
        raise CertificateVerificationError("certificate has no common name")


# --------------------------------------------------------------------------- Mosquitto


def mosquitto_config(
    out_dir: Path,
    *,
    port: int = 8883,
    bridge_username: str | Sequence[str] = "argus-bridge",
    bind: str = "0.0.0.0",  # noqa: S104 - a broker serves devices on every interface
    passphrase: bytes | None = None,
) -> Path:
    """Write out_dir/mosquitto-tls.conf (an mTLS listener block) and out_dir/acl; return the conf path.

    Works standalone (`mosquitto -c mosquitto-tls.conf`) or included from a main config; with
    other listeners in the main config set `per_listener_settings true` there, else acl_file
    applies to every listener. Creates an empty CRL when none exists, because Mosquitto refuses
    to start with a missing crlfile.
    """
    bridges = [bridge_username] if isinstance(bridge_username, str) else list(bridge_username)
    for name in bridges:
        validate_name(name)
    out_dir = Path(out_dir).resolve()
    for name in bridges:
        if (out_dir / DEVICES_DIR / name).exists():
            raise PkiError(f"{name!r} is a device identity; a bridge needs a service client name")
    for required in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (out_dir / required).exists():
            raise PkiError(f"{out_dir / required} is missing: run init-ca and issue-server first")
    crl_path = out_dir / CRL_FILE
    if not crl_path.exists():
        build_crl(out_dir, [], passphrase=passphrase)
    acl_path = out_dir / ACL_FILE
    acl = (
        "# Generated by `manage.py pki mosquitto-config`. The username is the client certificate CN.\n"
        "# A device may publish only to its own telemetry and status topics (the broker checks a\n"
        "# last will's topic too) and read only its own errors topic.\n"
        "pattern write devices/%u/telemetry\n"
        "pattern write devices/%u/status\n"
        "pattern read devices/%u/errors\n"
        "\n"
        "\n"
        "# The bridge reads every device's telemetry and status and publishes only the answers on\n"
        "# the errors topics. Each bridge process has its own certificate (`pki issue-client NAME`):\n"
        "# its CN is also its client id.\n"
        + "".join(
            f"user {name}\ntopic read devices/+/telemetry\ntopic read devices/+/status\n"
            f"topic write devices/+/errors\ntopic read $SYS/broker/#\n"
            for name in bridges
        )
    )
    # 0600: Mosquitto >= 2.0.16 warns about (and later versions refuse) world-readable ACL files.
    _write_atomic(acl_path, acl.encode("utf-8"), 0o600)
    conf = (
        "# Generated by `manage.py pki mosquitto-config`: mutual-TLS listener for devices and the bridge.\n"
        "# Mosquitto re-reads certfile, keyfile and crlfile on SIGHUP: rebuild crl.pem, then reload\n"
        "# (the Celery beat task devices.tasks.crl_renew does both; docs/device-identity.md).\n"
        f"listener {port} {bind}\n"
        f"cafile {out_dir / CA_CERT}\n"
        f"certfile {out_dir / SERVER_CERT}\n"
        f"keyfile {out_dir / SERVER_KEY}\n"
        f"crlfile {crl_path}\n"
        "tls_version tlsv1.2\n"
        "require_certificate true\n"
        "use_identity_as_username true\n"
        "# The client id is the CN too, whatever the client asks for: no certificate can take over\n"
        "# another client's session (the bridge's persistent one included) or kick it off.\n"
        "use_username_as_clientid true\n"
        f"acl_file {acl_path}\n"
    )
    conf_path = out_dir / MOSQUITTO_CONF
    _write_atomic(conf_path, conf.encode("utf-8"), 0o644)
    return conf_path


def publish_public_files(out_dir: Path, public_dir: Path) -> list[Path]:
    """Copy the CA certificate and the CRL (nothing secret) to where processes that must never
    read the CA key find them (the compose file's web, bridge and ingest containers); returns
    the files written."""
    written = []
    for name in (CA_CERT, CRL_FILE):
        source = out_dir / name
        if source.exists():
            _write_atomic(public_dir / name, source.read_bytes(), 0o644)
            written.append(public_dir / name)
    return written


def reload_broker(*, pid_file: str | Path | None = None, command: str | None = None) -> bool:
    """Tell the broker to re-read its CRL: SIGHUP to the pid in pid_file, and/or run command
    (split like a shell line, run without a shell). Returns whether a hook was configured and ran.

    Mosquitto re-reads certfile, keyfile and crlfile on SIGHUP; a hook that fails raises PkiError.
    """
    done = False
    if pid_file:
        try:
            pid = int(Path(pid_file).read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as exc:
            raise PkiError(f"could not SIGHUP the broker from pid file {pid_file}: {exc}") from exc
        log.info("sent SIGHUP to the broker (pid %s from %s)", pid, pid_file)
        done = True
    if command:
        result = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise PkiError(f"broker reload command {command!r} exited {result.returncode}: {result.stderr.strip()}")
        log.info("ran the broker reload command %r", command)
        done = True
    return done
