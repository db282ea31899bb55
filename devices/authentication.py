"""Device credentials of the HTTP API: API keys and JWTs signed with the device's certificate key.

Either credential maps to a `DeviceIdentity` through the public registry, then the device is
checked in its own tenant's schema. The tenant always comes from the credential: an API key
names its device and tenant, a JWT's `sub` is looked up in the registry and its signature must
verify with a certificate recorded for that device in that tenant.

401 (AuthenticationFailed) means "we do not know who you are"; 403 (PermissionDenied) means
"we know, and you may not" (revoked or expired key, disabled device).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from django.conf import settings
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from argus.models import DeviceAPIKey, DeviceRegistration, Organization
from argus.registry import in_schema
from devices import pki
from devices.models import Device, DeviceCertificate, DeviceStatus, DeviceType

log = logging.getLogger(__name__)

API_KEY_KEYWORD = "Api-Key"
BEARER_KEYWORD = "Bearer"
JWT_ALGORITHMS = ("ES256", "RS256")
REALM = 'realm="argus"'


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """The device a request speaks for, and the tenant schema it lives in."""

    logical_id: str
    schema: str
    device_id: int
    device_type_id: int
    # The device's type, read with the device row while authenticating (one query for both, the
    # type as fresh as the device): the ingest view needs it next.
    device_type: DeviceType | None = field(default=None, compare=False, repr=False)

    @property
    def is_authenticated(self) -> bool:
        # DRF and Django code ask request.user this.
        return True


# --------------------------------------------------------------------------- shared


def _credential(request: Request, keyword: str) -> str | None:
    """The credential after `Authorization: <keyword> `, None for another scheme; 401 if malformed."""
    parts = get_authorization_header(request).split()
    if not parts or parts[0].lower() != keyword.lower().encode():
        return None
    if len(parts) != 2:
        raise exceptions.AuthenticationFailed(f"Authorization header must be '{keyword} <credential>'.")
    try:
        return parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise exceptions.AuthenticationFailed("Credential contains non-ASCII characters.") from None


def _active_device(logical_id: str, schema: str, device_id: int) -> Device:
    """The device row in its tenant (call inside that tenant's schema); 403 unless it is active."""
    device = Device.objects.filter(pk=device_id, logical_identifier=logical_id).select_related("device_type").first()
    if device is None:
        # The registry says it exists, the tenant does not: it was just deleted or renamed.
        raise exceptions.PermissionDenied(f"Device {logical_id!r} no longer exists.")
    if device.status != DeviceStatus.ACTIVE:
        raise exceptions.PermissionDenied(f"Device {logical_id!r} is {device.status}.")
    return device


# --------------------------------------------------------------------------- API keys

# The key, its tenant's schema and its device's registration in one statement. Raw SQL: building
# and compiling the same lookup with the ORM (a subquery annotation) was a quarter of the CPU of
# an ingest request (make http-bench, py-spy --gil). Columns not selected are deferred.
_KEY_ROUTE_SQL = f"""
    SELECT k.id, k.prefix, k.hashed_key, k.revoked, k.expiry_date, k.logical_identifier, k.tenant_id,
           o.schema_name AS tenant_schema,
           (SELECT r.device_id FROM {DeviceRegistration._meta.db_table} r
             WHERE r.logical_identifier = k.logical_identifier AND r.tenant_id = k.tenant_id) AS registered_device_id
    FROM {DeviceAPIKey._meta.db_table} k JOIN {Organization._meta.db_table} o ON o.id = k.tenant_id
    WHERE k.prefix = %s
"""


def _api_key_with_route(prefix: str) -> tuple[DeviceAPIKey, str, int | None] | None:
    """The key with this prefix, its tenant's schema and its device's id in that schema (None when
    the device is not registered); None when there is no such key."""
    for api_key in DeviceAPIKey.objects.raw(_KEY_ROUTE_SQL, [prefix]):
        return api_key, api_key.__dict__["tenant_schema"], api_key.__dict__["registered_device_id"]
    return None


class DeviceAPIKeyAuthentication(BaseAuthentication):
    """`Authorization: Api-Key <prefix>.<secret>`: a key from `create_device_key` (hash stored)."""

    def authenticate(self, request: Request) -> tuple[DeviceIdentity, DeviceAPIKey] | None:
        key = _credential(request, API_KEY_KEYWORD)
        if key is None:
            return None
        prefix, dot, _ = key.partition(".")
        found = _api_key_with_route(prefix) if dot else None
        if found is None or not found[0].is_valid(key):
            raise exceptions.AuthenticationFailed("Invalid API key.")
        api_key, schema, registration = found
        if api_key.revoked:
            raise exceptions.PermissionDenied("This API key has been revoked.")
        if api_key.has_expired:
            raise exceptions.PermissionDenied("This API key has expired.")
        if registration is None:
            raise exceptions.PermissionDenied(f"Device {api_key.logical_identifier!r} no longer exists.")
        with in_schema(schema):
            device = _active_device(api_key.logical_identifier, schema, registration)
        identity = DeviceIdentity(
            api_key.logical_identifier, schema, device.pk, device.device_type_id, device_type=device.device_type
        )
        return identity, api_key

    def authenticate_header(self, request: Request) -> str:
        return f"{API_KEY_KEYWORD} {REALM}"


# --------------------------------------------------------------------------- JWT

_ca_lock = threading.Lock()
_ca_cache: dict[Path, tuple[int, x509.Certificate]] = {}


def ca_certificate() -> x509.Certificate | None:
    """The platform CA certificate (settings.ARGUS_PKI_DIR/ca.crt), re-read when the file changes."""
    path = Path(settings.ARGUS_PKI_DIR) / pki.CA_CERT
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    with _ca_lock:
        cached = _ca_cache.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, pki.load_certificate(path.read_bytes()))
            _ca_cache[path] = cached
        return cached[1]


def algorithm_for(cert: x509.Certificate) -> str | None:
    """The one JWT algorithm a certificate's key may sign with (None: unsupported key)."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return "RS256"
    return None


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A device JWT that verified, and the certificate that verified it."""

    claims: dict[str, Any]
    certificate_fingerprint: str


class DeviceJWTAuthentication(BaseAuthentication):
    """`Authorization: Bearer <jwt>` signed (ES256/RS256) with the key of a certificate our CA issued
    to the device. Claims: sub = logical_id, aud = argus, iat, exp (at most an hour after iat)."""

    def authenticate(self, request: Request) -> tuple[DeviceIdentity, VerifiedToken] | None:
        token = _credential(request, BEARER_KEYWORD)
        if token is None:
            return None
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError as exc:
            raise exceptions.AuthenticationFailed(f"Malformed token: {exc}") from None
        alg = header.get("alg")
        if alg not in JWT_ALGORITHMS:
            raise exceptions.AuthenticationFailed(f"Token algorithm {alg!r} is not accepted; use ES256 or RS256.")
        logical_id = unverified.get("sub")
        if not isinstance(logical_id, str) or not logical_id:
            raise exceptions.AuthenticationFailed("Token has no subject (sub = the device's logical id).")
        registration = (
            DeviceRegistration.objects.filter(logical_identifier=logical_id)
            .values_list("tenant__schema_name", "device_id")
            .first()
        )
        if registration is None:
            raise exceptions.AuthenticationFailed("Unknown device.")
        schema, device_id = registration
        ca = ca_certificate()
        if ca is None:
            log.error("JWT authentication needs the CA certificate in %s", settings.ARGUS_PKI_DIR)
            raise exceptions.AuthenticationFailed("Token authentication is not available.")
        with in_schema(schema):
            verified = self._verify(token, alg, header.get("kid"), logical_id, device_id, ca)
            device = _active_device(logical_id, schema, device_id)
        return DeviceIdentity(
            logical_id, schema, device.pk, device.device_type_id, device_type=device.device_type
        ), verified

    def _verify(
        self, token: str, alg: str, kid: Any, logical_id: str, device_id: int, ca: x509.Certificate
    ) -> VerifiedToken:
        """Claims of the token if a current, unrevoked certificate of the device verifies it."""
        now = timezone.now()
        certificates = DeviceCertificate.objects.filter(
            device_id=device_id, revoked_at__isnull=True, not_before__lte=now, not_after__gte=now
        ).only("pem", "fingerprint_sha256")
        if isinstance(kid, str) and kid:
            # During rotation the device names the certificate it signed with; others are not tried.
            certificates = certificates.filter(fingerprint_sha256=kid.lower().replace(":", ""))
        for record in certificates:
            claims = self._try_certificate(token, alg, record, logical_id, ca, now)
            if claims is not None:
                return VerifiedToken(claims=claims, certificate_fingerprint=record.fingerprint_sha256)
        raise exceptions.AuthenticationFailed("Token signature does not verify with a valid certificate of the device.")

    def _try_certificate(
        self, token: str, alg: str, record: DeviceCertificate, logical_id: str, ca: x509.Certificate, now: datetime
    ) -> dict[str, Any] | None:
        try:
            cert = pki.load_certificate(record.pem)
            pki.verify_device_certificate(cert, ca, at=now)
        except pki.PkiError as exc:
            log.warning("certificate %s of %s is not usable: %s", record.fingerprint_sha256, logical_id, exc)
            return None
        if pki.common_name(cert) != logical_id or algorithm_for(cert) != alg:
            return None
        audience = settings.ARGUS_JWT_AUDIENCE
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=cert.public_key(),  # type: ignore[arg-type]
                algorithms=[alg],
                audience=audience,
                options={"require": ["sub", "aud", "iat", "exp"]},
                leeway=settings.ARGUS_JWT_LEEWAY_SECONDS,
            )
        except jwt.InvalidSignatureError:
            return None
        except jwt.ExpiredSignatureError:
            raise exceptions.AuthenticationFailed("Token has expired.") from None
        except jwt.InvalidAudienceError:
            raise exceptions.AuthenticationFailed(f"Token audience must be {audience!r}.") from None
        except jwt.InvalidTokenError as exc:
            raise exceptions.AuthenticationFailed(f"Invalid token: {exc}") from None
        lifetime = claims["exp"] - claims["iat"]
        if lifetime > settings.ARGUS_JWT_MAX_LIFETIME_SECONDS:
            raise exceptions.AuthenticationFailed(
                f"Token lifetime (exp - iat) is {lifetime} s; at most {settings.ARGUS_JWT_MAX_LIFETIME_SECONDS} s."
            )
        return claims

    def authenticate_header(self, request: Request) -> str:
        return f"{BEARER_KEYWORD} {REALM}"


class IsDevice(BasePermission):
    """The request carries a device credential (anything else is 401)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        return isinstance(request.user, DeviceIdentity)


# --------------------------------------------------------------------------- OpenAPI


class DeviceAPIKeyScheme(OpenApiAuthenticationExtension):
    target_class = "devices.authentication.DeviceAPIKeyAuthentication"
    name = "deviceApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Api-Key <key>`, a key issued by `manage.py create_device_key LOGICAL_ID`.",
        }


class DeviceJWTScheme(OpenApiAuthenticationExtension):
    target_class = "devices.authentication.DeviceJWTAuthentication"
    name = "deviceJwt"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": (
                "A JWT signed (ES256 or RS256) with the private key of a device certificate issued by the "
                "platform CA. Claims: `sub` = the device's logical id, `aud` = `argus`, `iat`, `exp` "
                "(at most one hour after `iat`). Optional header `kid` = the certificate's SHA-256 fingerprint."
            ),
        }
