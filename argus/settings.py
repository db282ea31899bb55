"""Argus settings: one env-driven module (see .env.example for every variable)."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import dj_database_url
import django_stubs_ext
import environs
from django.core.exceptions import ImproperlyConfigured

from argus.environment import DEFAULT_SERVICE_URLS, read_dotenv
from argus.logs import configure_structlog, logging_config

# Lets generic admin/queryset annotations (ModelAdmin[Model]) run outside type checking.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent


# A `.env` beside manage.py fills in what the real environment does not set.
for _key, _value in read_dotenv(BASE_DIR / ".env").items():
    os.environ.setdefault(_key, _value)


# One typed reader for every variable (environs): a value of the wrong form stops the process
# with an error naming the variable, what it holds and what it should (not a traceback from deep
# inside, or a 500 on every request that reads it later).
_ENV = environs.Env(eager=True, expand_vars=False)


def _raw(name: str) -> str:
    # `<NAME>_FILE` points at a file holding the value (for secrets); an empty value (`NAME=` in
    # .env) means "use the default".
    file_path = os.environ.get(f"{name}_FILE")
    if file_path:
        try:
            return Path(file_path).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={file_path!r}: cannot read it ({exc.strerror})") from None
    return os.environ.get(name, "")


def _typed(name: str, parse: Callable[[str], Any], default: Any, expected: str) -> Any:
    raw = _raw(name)
    if not raw:
        return default
    os.environ[name] = raw  # environs reads the environment; the value may have come from <NAME>_FILE
    try:
        return parse(name)
    except environs.EnvError:
        raise ImproperlyConfigured(f"{name}={raw!r}: expected {expected} (default {default!r})") from None


def env(name: str, default: str = "") -> str:
    """A string setting."""
    return _raw(name) or default


def env_bool(name: str, default: bool = False) -> bool:
    """A boolean setting: 1/true/yes/on or 0/false/no/off."""
    return bool(_typed(name, lambda n: _ENV.bool(n), default, "a boolean (1/0, true/false, yes/no, on/off)"))


def env_int(name: str, default: int) -> int:
    """An integer setting."""
    return int(_typed(name, lambda n: _ENV.int(n), default, "a whole number"))


def env_list(name: str, default: str) -> list[str]:
    """A comma-separated list setting."""
    return [item.strip() for item in env(name, default).split(",") if item.strip()]


def env_float(name: str, default: float) -> float:
    """A number setting."""
    return float(_typed(name, lambda n: _ENV.float(n), default, "a number"))


def env_rate(name: str, default: str) -> str:
    """A rate as DRF writes it: `<count>/<period>`, the period second, minute, hour or day."""
    value = env(name, default)
    if not re.fullmatch(r"[1-9][0-9]*/(s|sec|second|m|min|minute|h|hour|d|day)", value.strip()):
        raise ImproperlyConfigured(
            f"{name}={value!r}: expected <count>/<period>, e.g. 600/min (period s, min, h or day)"
        )
    return value.strip()


DEBUG = env_bool("DEBUG", False)
TESTING = env_bool("ARGUS_TESTING", False)

SECRET_KEY = env("SECRET_KEY")
if not SECRET_KEY:
    if not (DEBUG or TESTING):
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off (see .env.example).")
    SECRET_KEY = "argus-insecure-development-key"  # noqa: S105 - debug/test only
# Rotating SECRET_KEY: the old keys, comma-separated, still verify sessions and signed values
# (password resets, messages) until they expire; only SECRET_KEY signs (docs/operations.md).
SECRET_KEY_FALLBACKS = env_list("ARGUS_SECRET_KEY_FALLBACKS", "")

# Host names this site answers for: tenants' domains (`.example.com` covers every subdomain)
# and the platform admin's. `*` only in DEBUG or the test suite: elsewhere a forged Host header
# could steer password-reset links and cache keys.
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "*" if DEBUG or TESTING else "localhost,127.0.0.1,[::1]")
if "*" in ALLOWED_HOSTS and not (DEBUG or TESTING):
    raise ImproperlyConfigured("ALLOWED_HOSTS=* is refused when DEBUG is off: list the host names (see .env.example).")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")
# The platform admin (tenants, domains, the device registry, API keys) answers only on these
# host names; on any other host that reaches the public site, /admin/ is 404. `*` = any host
# (the default in DEBUG only). Outside DEBUG the default is loopback: reach it through an SSH
# tunnel or name its host here.
ARGUS_PLATFORM_ADMIN_HOSTS = [
    h.lower() for h in env_list("ARGUS_PLATFORM_ADMIN_HOSTS", "*" if DEBUG or TESTING else "127.0.0.1,[::1]")
]
# Prometheus scrapes /metrics with `Authorization: Bearer <ARGUS_METRICS_TOKEN>`. Without a
# token, /metrics answers loopback clients only.
ARGUS_METRICS_TOKEN = env("ARGUS_METRICS_TOKEN")

# --- HTTPS (manage.py check --deploy passes with these defaults outside DEBUG) ---------------
# Behind a TLS-terminating proxy, set ARGUS_TRUST_X_FORWARDED_PROTO=1 so Django knows a request
# came over HTTPS (the proxy must overwrite X-Forwarded-Proto, never pass a client's through).
if env_bool("ARGUS_TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
_HTTPS = env_bool("ARGUS_HTTPS", not (DEBUG or TESTING))
SECURE_SSL_REDIRECT = _HTTPS
# Probes and scrapers speak plain HTTP inside the deployment's network.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SESSION_COOKIE_SECURE = _HTTPS
CSRF_COOKIE_SECURE = _HTTPS
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000 if _HTTPS else 0)
# Tenant sites are subdomains of one name: all of them are HTTPS, or none is.
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", _HTTPS)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
# Preloading is a commitment to the browsers' list an operator makes for a domain, not a default.
SILENCED_SYSTEM_CHECKS = ["security.W021"]

# --- Services -------------------------------------------------------------------------------
DATABASE_URL = env("DATABASE_URL", DEFAULT_SERVICE_URLS["DATABASE_URL"])
REDIS_URL = env("REDIS_URL", DEFAULT_SERVICE_URLS["REDIS_URL"])
MQTT_URL = env("MQTT_URL", DEFAULT_SERVICE_URLS["MQTT_URL"])
# One NATS server, or a cluster's servers comma-separated (`nats://n1:4222,nats://n2:4222,...`):
# every process connects to one of them and moves to another when it fails (telemetry.jetstream.nats_servers).
NATS_URL = env("NATS_URL", DEFAULT_SERVICE_URLS["NATS_URL"])
ARGUS_PKI_DIR = Path(env("ARGUS_PKI_DIR", str(BASE_DIR / ".pki")))
# Optional: a directory that receives a copy of the CA certificate and the CRL whenever the CRL is
# renewed, for processes that must not see the CA key (see docker/compose.yaml).
ARGUS_PKI_PUBLIC_DIR = env("ARGUS_PKI_PUBLIC_DIR", "")

DATABASES = {
    "default": {
        **dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 60)),
        "ENGINE": "django_tenants.postgresql_backend",
    }
}
DATABASE_ROUTERS = ("django_tenants.routers.TenantSyncRouter",)

CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_FUNCTION": "argus.cache.make_key",
        "REVERSE_KEY_FUNCTION": "argus.cache.reverse_key",
        # The cache only saves work: while Redis is unavailable a read is a miss and a write is
        # skipped (profiles then come from PostgreSQL), instead of failing the message in hand.
        # A 20 s Redis outage dead-lettered 143 envelopes before (tests/test_outages.py).
        "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient", "IGNORE_EXCEPTIONS": True},
    }
}

# --- Applications and tenancy ---------------------------------------------------------------
SHARED_APPS = [
    "django_tenants",
    "argus",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    # Before the admin: its admin/base_site.html adds the dashboard link to the admin's header.
    "dashboard",
    "django.contrib.admin",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    # Swagger UI's and Redoc's files, served by the app (no CDN): SPECTACULAR_SETTINGS below.
    "drf_spectacular_sidecar",
    # The hashed-key base of argus.DeviceAPIKey (public schema).
    "rest_framework_api_key",
    "axes",
    "bridge",
    # The device admin's import (devices/admin.py): its templates and static files; no models.
    "import_export",
]
# The development tools' commands (demo, simulate, bench, chunk_bench) where the checkout has
# them; the Docker image leaves devtools/ out. No models: nothing to migrate.
if importlib.util.find_spec("devtools") is not None:
    SHARED_APPS.append("devtools")
# Users live in each tenant's schema: a tenant admin logs in at the tenant's own domain.
TENANT_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.admin",
    # The read API's user tokens, kept beside the users (`tenant_command drf_create_token`).
    "rest_framework.authtoken",
    "devices",
    "assets",
    "telemetry",
]
INSTALLED_APPS = SHARED_APPS + [app for app in TENANT_APPS if app not in SHARED_APPS]

TENANT_MODEL = "argus.Organization"
TENANT_DOMAIN_MODEL = "argus.Domain"
# `SET search_path` only when the schema changed (set_tenant, a new connection, a rollback), not
# before every statement: django-tenants' default doubled the round trips of every query, and
# was the largest cost of an HTTP ingest request (make http-bench profile, BENCHMARKS.md).
TENANT_LIMIT_SET_CALLS = True
PUBLIC_SCHEMA_NAME = "public"
# The public site (platform admin, and the API, which routes by credential) has the same URLs as a
# tenant's site; what differs is what the admin shows (see argus/admin.py) and who may reach it
# (argus/middleware.py). Set anyway: django-tenants then marks public requests (request.urlconf).
PUBLIC_SCHEMA_URLCONF = "argus.urls"
ROOT_URLCONF = "argus.urls"
# Devices post to whatever host name they were given: unknown hosts get the public site,
# where the ingestion API routes by credential, not by host.
SHOW_PUBLIC_IF_NO_TENANT_FOUND = True

MIDDLEWARE = [
    # django-tenants' TenantMainMiddleware, answering 503 while the database is unavailable.
    "argus.middleware.TenantMiddleware",
    "argus.middleware.log_context_middleware",
    "django.middleware.security.SecurityMiddleware",
    # Static files (admin, dashboard, Swagger UI/Redoc) from every web process, DEBUG on or off,
    # on every host: after the tenant middleware, ahead of sessions, CSRF and the rest.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "argus.middleware.PlatformAdminHostMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into its lockout response.
    "axes.middleware.AxesMiddleware",
]

# --- Login throttling (django-axes) ------------------------------------------------------------
# Failed admin logins are counted per (tenant + username, client address); after
# ARGUS_LOGIN_FAILURE_LIMIT of them that pair is locked out for ARGUS_LOGIN_COOLOFF_MINUTES.
# The records live in the public schema (axes is a shared app); the username is prefixed with
# the tenant's schema, so a lockout in one tenant never locks out a same-named user of another.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("ARGUS_LOGIN_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("ARGUS_LOGIN_COOLOFF_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_USERNAME_CALLABLE = "argus.middleware.tenant_scoped_username"
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "dashboard.context.dashboard_link",
            ],
        },
    },
]

WSGI_APPLICATION = "argus.wsgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
if TESTING:
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# Filled by `manage.py collectstatic` (docker/Dockerfile runs it at build time); WhiteNoise serves it
# with hashed names and far-future caching. In DEBUG and the test suite WhiteNoise reads the apps'
# static directories instead, so `make demo` and the tests need no collectstatic.
STATIC_ROOT = Path(env("STATIC_ROOT", str(BASE_DIR / "staticfiles")))
WHITENOISE_USE_FINDERS = DEBUG or TESTING
if WHITENOISE_USE_FINDERS:
    # ... so an uncollected STATIC_ROOT is expected there, not worth WhiteNoise's warning per process.
    warnings.filterwarnings("ignore", message="No directory at: ", category=UserWarning)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG or TESTING
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

REST_FRAMEWORK: dict[str, Any] = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Argus API",
    "DESCRIPTION": "IoT telemetry ingestion and platform API.",
    "VERSION": "1.0.0",
    # 3.1: full JSON Schema, so the telemetry body's schema can say what the endpoint refuses
    # (metric names are constrained through propertyNames, which 3.0 lacks).
    "OAS_VERSION": "3.1.0",
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "argus.api.problem_responses"],
    # Enum components named by their field where two models' fields share a name.
    "ENUM_NAME_OVERRIDES": {},
    # Swagger UI (/api/docs/) and Redoc (/api/redoc/) load their files from our static files.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Pipeline -------------------------------------------------------------------------------
# Largest MQTT/HTTP payload accepted (bytes); larger ones are rejected (stored cut to this size
# as a rejected raw row of the device; dead letters when the device is unknown) / refused with 413.
ARGUS_MAX_PAYLOAD_BYTES = env_int("ARGUS_MAX_PAYLOAD_BYTES", 256 * 1024)
# Readings whose timestamp is further than this from the receive time are rejected.
ARGUS_MAX_FUTURE_SECONDS = env_int("ARGUS_MAX_FUTURE_SECONDS", 24 * 3600)
ARGUS_MAX_PAST_SECONDS = env_int("ARGUS_MAX_PAST_SECONDS", 365 * 24 * 3600)
# devices.last_seen and assets.last_telemetry_at are rewritten about once per this many seconds.
ARGUS_LAST_SEEN_RESOLUTION_SECONDS = env_float("ARGUS_LAST_SEEN_RESOLUTION_SECONDS", 30.0)
# What the apps above telemetry do when it stores something (telemetry/hooks.py): telemetry never
# imports them, these dotted paths wire them in.
ARGUS_TELEMETRY_HOOKS = {
    "batch_committed": "assets.hooks.queue_evaluation",
    "transaction_reassembled": "assets.hooks.evaluate",
    "devices_heard": "assets.hooks.mark_heard",
}
# Gauges the web /metrics reads from the database at scrape time (argus/metrics.py: the kernel
# never imports the apps that define them).
ARGUS_WEB_METRICS_COLLECTORS = ["devices.metrics.PresenceCollector"]
# Daily partitions of telemetry_history created ahead of time.
ARGUS_PARTITION_DAYS_AHEAD = env_int("ARGUS_PARTITION_DAYS_AHEAD", 7)

# Every process's logs (argus/logs.py): human-readable lines, or one JSON object per line with
# ARGUS_LOG_FORMAT=json; each names its process and the tenant, device and msg_id it concerns.
LOGGING = logging_config(fmt=env("ARGUS_LOG_FORMAT", "console"), level=env("LOG_LEVEL", "INFO"))
configure_structlog()

# JetStream (see telemetry/jetstream.py for what each limit protects).
ARGUS_STREAM_MAX_BYTES = env_int("ARGUS_STREAM_MAX_BYTES", 8 * 1024**3)
ARGUS_DEADLETTER_MAX_BYTES = env_int("ARGUS_DEADLETTER_MAX_BYTES", 1024**3)
# Dead letters older than this are dropped by JetStream (list and replay them before: manage.py deadletters).
ARGUS_DEADLETTER_MAX_AGE_DAYS = env_float("ARGUS_DEADLETTER_MAX_AGE_DAYS", 30.0)
# Copies of each stream JetStream keeps: 1 on one nats-server, 3 in a three-node cluster (a
# stream then survives one node lost; 5 survives two). Odd, at most the cluster's size (max 5).
ARGUS_STREAM_REPLICAS = env_int("ARGUS_STREAM_REPLICAS", 1)
if ARGUS_STREAM_REPLICAS not in (1, 2, 3, 4, 5):
    raise ImproperlyConfigured(f"ARGUS_STREAM_REPLICAS={ARGUS_STREAM_REPLICAS}: expected 1 to 5 (1 or 3)")
# How long JetStream remembers a message id (Nats-Msg-Id): a publish retried within it is stored once.
ARGUS_STREAM_DUPLICATE_WINDOW_SECONDS = env_float("ARGUS_STREAM_DUPLICATE_WINDOW_SECONDS", 120.0)
ARGUS_INGEST_MAX_DELIVER = env_int("ARGUS_INGEST_MAX_DELIVER", 5)
ARGUS_INGEST_ACK_WAIT_SECONDS = env_float("ARGUS_INGEST_ACK_WAIT_SECONDS", 30.0)
ARGUS_INGEST_MAX_ACK_PENDING = env_int("ARGUS_INGEST_MAX_ACK_PENDING", 20000)
ARGUS_INGEST_BATCH = env_int("ARGUS_INGEST_BATCH", 1000)
ARGUS_INGEST_BATCH_WAIT_SECONDS = env_float("ARGUS_INGEST_BATCH_WAIT_SECONDS", 0.05)
# Bridge: MQTT client id (a persistent session is kept under it), optional shared-subscription
# group so several bridges split the load, and how many publishes may await their PubAck.
ARGUS_BRIDGE_CLIENT_ID = env("ARGUS_BRIDGE_CLIENT_ID", "argus-bridge-1")
ARGUS_BRIDGE_SHARE_GROUP = env("ARGUS_BRIDGE_SHARE_GROUP", "")
ARGUS_BRIDGE_MAX_INFLIGHT = env_int("ARGUS_BRIDGE_MAX_INFLIGHT", 4000)
# Messages of one tenant travel to JetStream in envelopes of at most this many messages/bytes
# (NATS refuses messages over its max_payload, 1 MB by default).
ARGUS_BRIDGE_ENVELOPE_MESSAGES = env_int("ARGUS_BRIDGE_ENVELOPE_MESSAGES", 500)
ARGUS_BRIDGE_ENVELOPE_BYTES = env_int("ARGUS_BRIDGE_ENVELOPE_BYTES", 512 * 1024)
# How long the bridge lets a partial envelope fill before sending it: at moderate rates this
# turns many envelopes of a few messages into fewer, fuller ones (less CPU in every stage).
ARGUS_BRIDGE_LINGER_SECONDS = env_float("ARGUS_BRIDGE_LINGER_SECONDS", 0.02)
# MQTT protocol of the bridge's own connection: "3.1.1" (default, cheaper per message) or "5".
# Per-device rate limit at the bridge (token bucket): messages/s on average and at once. What a
# device sends beyond it is stored as rejected (`rate_limited`), so one device flooding cannot
# starve the others. 0 = no limit. A chunked gateway sends its chunks at once: keep the burst
# above the largest transaction's chunk count.
ARGUS_BRIDGE_DEVICE_RATE = env_float("ARGUS_BRIDGE_DEVICE_RATE", 100.0)
ARGUS_BRIDGE_DEVICE_BURST = env_float("ARGUS_BRIDGE_DEVICE_BURST", 1000.0)
ARGUS_BRIDGE_ROUTE_TTL_SECONDS = env_float("ARGUS_BRIDGE_ROUTE_TTL_SECONDS", 60.0)
# Presence and feedback to the device (issue 17; docs/ingestion.md, "Status and errors"): a device of a
# type with an expected interval is inactive once silent for this many intervals; rejections of
# the types that opt in are answered on devices/<id>/errors at most at this rate per device
# (token bucket: per second on average, at once; both above 0), the rest only counted.
ARGUS_PRESENCE_INACTIVE_INTERVALS = env_int("ARGUS_PRESENCE_INACTIVE_INTERVALS", 3)
ARGUS_DEVICE_ERRORS_RATE = env_float("ARGUS_DEVICE_ERRORS_RATE", 0.2)
ARGUS_DEVICE_ERRORS_BURST = env_float("ARGUS_DEVICE_ERRORS_BURST", 5.0)
ARGUS_BRIDGE_MQTT_PROTOCOL = env("ARGUS_BRIDGE_MQTT_PROTOCOL", "3.1.1")
ARGUS_BRIDGE_SESSION_EXPIRY_SECONDS = env_int("ARGUS_BRIDGE_SESSION_EXPIRY_SECONDS", 7 * 24 * 3600)
# mTLS client credential of the bridge when MQTT_URL is mqtts:// (files from `pki issue-client`).
ARGUS_BRIDGE_CERT = env("ARGUS_BRIDGE_CERT", str(ARGUS_PKI_DIR / "clients" / "argus-bridge.crt"))
ARGUS_BRIDGE_KEY = env("ARGUS_BRIDGE_KEY", str(ARGUS_PKI_DIR / "clients" / "argus-bridge.key"))
ARGUS_BRIDGE_CA = env("ARGUS_BRIDGE_CA", str(ARGUS_PKI_DIR / "ca.crt"))
# Metrics and probe ports (/metrics, /healthz, /readyz) of the long-running commands (0 = off).
ARGUS_BRIDGE_METRICS_PORT = env_int("ARGUS_BRIDGE_METRICS_PORT", 9101)
ARGUS_INGEST_METRICS_PORT = env_int("ARGUS_INGEST_METRICS_PORT", 9102)
# The Celery worker's (argus/celery_metrics.py); with the prefork pool it needs PROMETHEUS_MULTIPROC_DIR.
ARGUS_CELERY_METRICS_PORT = env_int("ARGUS_CELERY_METRICS_PORT", 9103)
# Address those ports listen on: loopback unless a scraper elsewhere must reach them (the
# compose file sets 0.0.0.0 inside its private network, where the ports are not published).
ARGUS_WORKER_METRICS_ADDR = env("ARGUS_WORKER_METRICS_ADDR", "127.0.0.1")

# --- Celery -------------------------------------------------------------------------------
# Durable by default: a task is acknowledged after it ran, and one whose worker died is given
# to another worker; every task is idempotent so running twice is harmless.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", REDIS_URL)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 300)}
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# Beat's state file: under .run/ (git-ignored), not `celerybeat-schedule.*` in the checkout.
CELERY_BEAT_SCHEDULER = "argus.celery:BeatScheduler"
CELERY_BEAT_SCHEDULE_FILENAME = env("CELERY_BEAT_SCHEDULE_FILENAME", str(BASE_DIR / ".run" / "celerybeat-schedule"))
CELERY_BEAT_SCHEDULE = {
    "partitions-ensure": {"task": "telemetry.tasks.partitions_ensure_all", "schedule": 3600.0},
    "health-recompute": {"task": "assets.tasks.health_recompute_all", "schedule": 300.0},
}

# --- HTTP ingestion API (devices/authentication.py, telemetry/api/) ------------------------
# Every API error is application/problem+json (RFC 9457).
REST_FRAMEWORK["EXCEPTION_HANDLER"] = "argus.problems.problem_exception_handler"
# Requests per device and period (DRF rate syntax: N/s, N/min, N/hour, N/day), counted in Redis.
ARGUS_HTTP_RATE_LIMIT = env_rate("ARGUS_HTTP_RATE_LIMIT", "600/min")
# How long POST /api/v1/telemetry waits for JetStream's PubAck before answering 503.
ARGUS_HTTP_PUBLISH_TIMEOUT_SECONDS = env_float("ARGUS_HTTP_PUBLISH_TIMEOUT_SECONDS", 5.0)
# Retry-After (seconds) sent with 503 when the pipeline is unavailable.
ARGUS_HTTP_RETRY_AFTER_SECONDS = env_int("ARGUS_HTTP_RETRY_AFTER_SECONDS", 5)
# Device JWTs: audience, longest exp - iat, and clock skew tolerated.
ARGUS_JWT_AUDIENCE = env("ARGUS_JWT_AUDIENCE", "argus")
ARGUS_JWT_MAX_LIFETIME_SECONDS = env_int("ARGUS_JWT_MAX_LIFETIME_SECONDS", 3600)
ARGUS_JWT_LEEWAY_SECONDS = env_int("ARGUS_JWT_LEEWAY_SECONDS", 30)
# Django must let a body of the largest accepted payload through, so the view can answer 413
# itself (with problem+json) for anything larger; admin forms keep Django's default headroom.
DATA_UPLOAD_MAX_MEMORY_SIZE = max(ARGUS_MAX_PAYLOAD_BYTES + 64 * 1024, 2_621_440)
# --- end HTTP ingestion API ------------------------------------------------------------------

# --- Live updates (argus/live.py) and the dashboard (dashboard/) -------------------------------
# Each process publishes at most one event per tenant per interval (0: live updates off), with at
# most ARGUS_LIVE_MAX_ITEMS devices (alerts, assets) per event: the newest win. Each page's stream
# passes on only the devices the page shows, so the bound is the size of a fleet whose every
# device's reading must reach an open page within an interval (2,000: ~300 KB an event).
ARGUS_LIVE_INTERVAL_SECONDS = env_float("ARGUS_LIVE_INTERVAL_SECONDS", 0.5)
ARGUS_LIVE_MAX_ITEMS = env_int("ARGUS_LIVE_MAX_ITEMS", 2000)
# An open page's event stream sends a keep-alive this often; the page calls itself stale after
# three missed ones.
ARGUS_LIVE_PING_SECONDS = env_float("ARGUS_LIVE_PING_SECONDS", 5.0)
# The port of the ASGI server (argus/asgi.py) that serves the dashboard and its event stream, when
# it is not the server the admin is on (the admin's header links there); empty: the same server.
ARGUS_DASHBOARD_PORT = env("ARGUS_DASHBOARD_PORT", "")

# --- Read API (docs/api.md): users of a tenant, on the tenant's host ---------------------------
# Lists are cursor-paginated: `limit` up to ARGUS_API_MAX_PAGE_SIZE, ARGUS_API_PAGE_SIZE if absent.
ARGUS_API_PAGE_SIZE = env_int("ARGUS_API_PAGE_SIZE", 50)
ARGUS_API_MAX_PAGE_SIZE = env_int("ARGUS_API_MAX_PAGE_SIZE", 500)
# One history request covers at most this many buckets (10,080: a week of minutes, 35 days of
# 5-minute buckets, 14 months of hours, 27 years of days) ...
ARGUS_API_HISTORY_MAX_BUCKETS = env_int("ARGUS_API_HISTORY_MAX_BUCKETS", 10_080)
# ... and, for raw points, at most this long a range, read in pages of up to ARGUS_API_MAX_POINTS.
ARGUS_API_HISTORY_RAW_MAX_SECONDS = env_int("ARGUS_API_HISTORY_RAW_MAX_SECONDS", 7 * 24 * 3600)
ARGUS_API_MAX_POINTS = env_int("ARGUS_API_MAX_POINTS", 5000)
# An asset's health history: at most this long a range per request (pages of ARGUS_API_MAX_POINTS).
ARGUS_API_HEALTH_MAX_SECONDS = env_int("ARGUS_API_HEALTH_MAX_SECONDS", 92 * 24 * 3600)
# The largest JSON document (metadata) a client may store on a device or an asset, in bytes.
ARGUS_API_MAX_METADATA_BYTES = env_int("ARGUS_API_MAX_METADATA_BYTES", 16 * 1024)

# Bulk provisioning (assets/provisioning.py: `manage.py provision`, the device admin's import):
# the bounds of one file.
ARGUS_PROVISION_MAX_BYTES = env_int("ARGUS_PROVISION_MAX_BYTES", 50 * 1024 * 1024)
ARGUS_PROVISION_MAX_ROWS = env_int("ARGUS_PROVISION_MAX_ROWS", 100_000)
ARGUS_PROVISION_MAX_ASSETS_PER_DEVICE = env_int("ARGUS_PROVISION_MAX_ASSETS_PER_DEVICE", 20)
# Between the admin import's dry run and its confirmation the file waits in the cache (Redis),
# which every web process shares, not in one process's temporary directory.
IMPORT_EXPORT_TMP_STORAGE_CLASS = "import_export.tmp_storages.CacheStorage"

# Chunked transactions: the sweeper expires a transaction this long after its TTL (so chunks
# received in time but still in the pipeline land first), and enqueues reassembly again for
# complete transactions still pending after this many seconds (a lost Celery message).
ARGUS_CHUNK_EXPIRY_GRACE_SECONDS = env_float("ARGUS_CHUNK_EXPIRY_GRACE_SECONDS", 5.0)
ARGUS_CHUNK_REENQUEUE_SECONDS = env_float("ARGUS_CHUNK_REENQUEUE_SECONDS", 30.0)
ARGUS_CHUNK_SWEEP_SECONDS = env_float("ARGUS_CHUNK_SWEEP_SECONDS", 5.0)
CELERY_BEAT_SCHEDULE["chunks-sweep"] = {
    "task": "telemetry.tasks.chunks_sweep_all",
    "schedule": ARGUS_CHUNK_SWEEP_SECONDS,
}

# --- Retention (telemetry/retention.py; docs/retention.md) --------------------------------------
# Days of history and raw messages kept, for tenants without their own `retention_days`. The beat
# task drops whole daily partitions once all of their rows are older, every this many seconds.
ARGUS_RETENTION_DAYS = env_int("ARGUS_RETENTION_DAYS", 90)
ARGUS_RETENTION_SWEEP_SECONDS = env_float("ARGUS_RETENTION_SWEEP_SECONDS", 3600.0)
# A redelivery of a message (same ingest key) arrives at most this long after the first copy:
# within it, a copy received across midnight is still recognised (telemetry/storage.py).
ARGUS_RAW_DEDUPE_WINDOW_SECONDS = env_int("ARGUS_RAW_DEDUPE_WINDOW_SECONDS", 3600)
CELERY_BEAT_SCHEDULE["retention"] = {"task": "telemetry.tasks.retention_all", "schedule": ARGUS_RETENTION_SWEEP_SECONDS}

# --- Device certificates: CRL renewal and the broker reload hook (docs/device-identity.md) ---
# Validity of the CRL we sign. OpenSSL refuses every client once it has passed, so the beat task
# below rebuilds it once less than ARGUS_CRL_RENEW_WITHIN_SECONDS remain (daily with the
# defaults, leaving 6 days to notice a stopped worker), and at once after a revocation.
ARGUS_CRL_DAYS = env_int("ARGUS_CRL_DAYS", 7)
ARGUS_CRL_RENEW_WITHIN_SECONDS = env_int("ARGUS_CRL_RENEW_WITHIN_SECONDS", 6 * 24 * 3600)
ARGUS_CRL_CHECK_SECONDS = env_float("ARGUS_CRL_CHECK_SECONDS", 3600.0)
# How the broker is told to re-read the CRL after a rebuild: SIGHUP to the pid in this file
# (Mosquitto's `pid_file`), and/or this command (run without a shell, e.g.
# `docker kill --signal HUP argus-mosquitto-1`). Neither set: the CRL is rebuilt, not applied.
ARGUS_BROKER_PID_FILE = env("ARGUS_BROKER_PID_FILE", "")
ARGUS_BROKER_RELOAD_COMMAND = env("ARGUS_BROKER_RELOAD_COMMAND", "")
CELERY_BEAT_SCHEDULE["crl-renew"] = {"task": "devices.tasks.crl_renew", "schedule": ARGUS_CRL_CHECK_SECONDS}

# --- Alerts, health scores, webhooks (assets/; docs/alerts-and-health.md) --------------------
# The beat sweep: duration rules whose condition has held long enough without a new reading,
# no-data rules, and webhook deliveries due for a retry, every this many seconds per tenant.
ARGUS_ALERT_SWEEP_SECONDS = env_float("ARGUS_ALERT_SWEEP_SECONDS", 10.0)
CELERY_BEAT_SCHEDULE["alerts-sweep"] = {"task": "assets.tasks.alerts_sweep_all", "schedule": ARGUS_ALERT_SWEEP_SECONDS}
# An asset's score is recomputed at most once per this many seconds, however often its devices report.
ARGUS_HEALTH_DEBOUNCE_SECONDS = env_float("ARGUS_HEALTH_DEBOUNCE_SECONDS", 1.0)
# Webhooks: per-attempt timeout, attempts before giving up, backoff (base * 2^(n-1), capped).
ARGUS_WEBHOOK_TIMEOUT_SECONDS = env_float("ARGUS_WEBHOOK_TIMEOUT_SECONDS", 5.0)
ARGUS_WEBHOOK_MAX_ATTEMPTS = env_int("ARGUS_WEBHOOK_MAX_ATTEMPTS", 8)
ARGUS_WEBHOOK_RETRY_BASE_SECONDS = env_float("ARGUS_WEBHOOK_RETRY_BASE_SECONDS", 10.0)
ARGUS_WEBHOOK_RETRY_MAX_SECONDS = env_float("ARGUS_WEBHOOK_RETRY_MAX_SECONDS", 3600.0)
# Webhooks call public addresses only (argus/outbound.py); these networks are allowed besides,
# e.g. "10.0.0.0/8" for a receiver inside your own network. Empty by default.
ARGUS_WEBHOOK_ALLOWED_NETWORKS = [
    ipaddress.ip_network(n, strict=False) for n in env_list("ARGUS_WEBHOOK_ALLOWED_NETWORKS", "")
]

# /healthz, /readyz and /metrics are answered ahead of the tenant middleware (any host, database
# down included); every request is counted and timed before anything else (argus/metrics.py).
MIDDLEWARE = ["argus.metrics.request_metrics_middleware", "argus.views.probe_middleware", *MIDDLEWARE]
# /readyz runs these checks (dotted paths to functions returning argus.health.CheckResult),
# concurrently, and answers 503 when one fails. Append to add one (docs/operations.md).
ARGUS_READINESS_CHECKS = [
    "argus.health.database_check",
    "argus.health.redis_check",
    "telemetry.health.jetstream_check",
    "telemetry.health.lag_check",
    "devices.health.crl_check",
]
# Each check gets this long to answer (connect timeouts included); one still waiting counts as failed.
ARGUS_READY_CHECK_TIMEOUT_SECONDS = env_float("ARGUS_READY_CHECK_TIMEOUT_SECONDS", 2.0)
# /readyz (web, runingest) fails while the ingest consumer has more messages than this not yet delivered.
ARGUS_READY_MAX_LAG = env_int("ARGUS_READY_MAX_LAG", 100_000)
# /readyz fails when the broker's CRL (ARGUS_PKI_DIR/crl.pem) runs out sooner than this.
ARGUS_READY_CRL_MIN_SECONDS = env_int("ARGUS_READY_CRL_MIN_SECONDS", 24 * 3600)
