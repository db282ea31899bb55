"""Shared fixtures: two committed tenants on the real PostgreSQL test database, and personas.

Tenants are created once per session (creating one migrates a schema) and committed, so that
processes started by integration tests (runbridge, runingest, celery) see them too. Unit tests
run inside a transaction that is rolled back; integration tests use `live_db` and unique ids.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django_tenants.utils import schema_context

from argus.models import Domain, Organization
from argus.registry import use_public_schema
from devices import pki
from devices.models import Device, DeviceType, ProcessingMode
from devtools.services import ServerHandle, start_mosquitto, start_nats
from tests.pipeline import Pipeline


@dataclass
class TenantPersona:
    """A tenant with the host name its site answers on."""

    tenant: Organization
    host: str

    @property
    def schema(self) -> str:
        return self.tenant.schema_name


def _ensure_tenant(schema: str, host: str) -> TenantPersona:
    tenant = Organization.objects.filter(schema_name=schema).first()
    if tenant is None:
        tenant = Organization.objects.create(schema_name=schema, name=f"Tenant {schema}")
    Domain.objects.get_or_create(domain=host, defaults={"tenant": tenant, "is_primary": True})
    return TenantPersona(tenant=tenant, host=host)


@pytest.fixture(autouse=True)
def public_schema_first() -> Iterator[None]:
    """Each test starts on the public schema (a request through the test client leaves the
    connection on the tenant it served)."""
    use_public_schema()
    yield
    use_public_schema()


@pytest.fixture(scope="session")
def django_db_setup(
    request: pytest.FixtureRequest,
    django_test_environment: None,
    django_db_blocker: Any,
    django_db_keepdb: bool,
    django_db_createdb: bool,
    django_db_modify_db_settings: None,
) -> Iterator[None]:
    """pytest-django's, except that the test database is always set up. Its own sets up only the
    databases that tests marked `django_db` name, so a run of only live-database tests (the
    `tenants` and `live_db` fixtures, e.g. `pytest tests/test_pipeline.py`) ran against the
    development database."""
    from django.test.utils import setup_databases, teardown_databases

    keepdb = django_db_keepdb and not django_db_createdb
    with django_db_blocker.unblock():
        config = setup_databases(
            verbosity=request.config.option.verbose,
            interactive=False,
            aliases={"default": {}},
            serialized_aliases=set(),
            keepdb=keepdb,
        )
    yield
    if not keepdb:
        with django_db_blocker.unblock():
            teardown_databases(config, verbosity=request.config.option.verbose)


@pytest.fixture(scope="session", autouse=True)
def empty_test_redis() -> None:
    """Start from an empty test Redis database: tasks queued and profiles cached by an earlier
    run (whose database is gone) must not reach this one's workers."""
    redis.Redis.from_url(str(settings.CACHES["default"]["LOCATION"])).flushdb()


@pytest.fixture(scope="session")
def tenants(django_db_setup: Any, django_db_blocker: Any) -> dict[str, TenantPersona]:
    """Tenants `alpha` and `beta`, committed for the whole session."""
    with django_db_blocker.unblock():
        return {
            "alpha": _ensure_tenant("alpha", "alpha.test"),
            "beta": _ensure_tenant("beta", "beta.test"),
        }


@pytest.fixture
def alpha(tenants: dict[str, TenantPersona]) -> TenantPersona:
    return tenants["alpha"]


@pytest.fixture
def beta(tenants: dict[str, TenantPersona]) -> TenantPersona:
    return tenants["beta"]


@pytest.fixture
def in_alpha(db: None, alpha: TenantPersona) -> Iterator[TenantPersona]:
    """Run the test (rolled back afterwards) inside tenant alpha's schema."""
    connection.set_tenant(alpha.tenant)  # type: ignore[attr-defined]
    try:
        yield alpha
    finally:
        use_public_schema()


@pytest.fixture
def live_db(tenants: dict[str, TenantPersona], django_db_blocker: Any) -> Iterator[None]:
    """Committed database access, for tests whose data other processes must see."""
    with django_db_blocker.unblock():
        try:
            yield
        finally:
            use_public_schema()


def unique_id(prefix: str) -> str:
    """A logical identifier no other test (or earlier run) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_device_type(**overrides: Any) -> DeviceType:
    """A valid endpoint device type in the current schema."""
    values: dict[str, Any] = {
        "name": unique_id("type"),
        "processing_mode": ProcessingMode.ENDPOINT,
        "metrics": ["temperature", "humidity"],
        "message_schema": {
            "type": "object",
            "properties": {"values": {"type": "object", "properties": {"temperature": {"type": "number"}}}},
        },
    }
    values.update(overrides)
    device_type = DeviceType(**values)
    device_type.full_clean()
    device_type.save()
    return device_type


def make_device(device_type: DeviceType, **overrides: Any) -> Device:
    """A device of the given type in the current schema, registered platform-wide."""
    values: dict[str, Any] = {"name": "test device", "logical_identifier": unique_id("DEV")}
    values.update(overrides)
    return Device.objects.create(device_type=device_type, **values)


@pytest.fixture
def pki_dir(tmp_path: Path, settings: Any) -> Path:
    """A fresh CA that settings point at (ARGUS_PKI_DIR)."""
    out = tmp_path / "pki"
    pki.init_ca(out)
    settings.ARGUS_PKI_DIR = out
    return out


def tenant_admin_client(persona: TenantPersona) -> Client:
    """A browser logged in as a superuser of the given tenant, on that tenant's host."""
    with schema_context(persona.schema):
        user_model = get_user_model()
        username = unique_id("admin")
        user = user_model._default_manager.create_superuser(
            username=username, email=f"{username}@example.com", password="pw-for-tests"
        )
        # Sessions live in the tenant's schema too, so log in while it is active. (force_login:
        # django-axes wants the request that Client.login does not pass to authenticate().)
        client = Client(HTTP_HOST=persona.host)
        client.force_login(user)
    return client


# --- Real pipeline processes (see tests/pipeline.py) ---------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[ServerHandle]:
    with start_mosquitto() as handle:
        yield handle


@pytest.fixture(scope="module")
def nats_server() -> Iterator[ServerHandle]:
    with start_nats() as handle:
        yield handle


@pytest.fixture
def pipeline(broker: ServerHandle, nats_server: ServerHandle, live_db: None, tmp_path: Path) -> Iterator[Pipeline]:
    running = Pipeline(broker, nats_server, tmp_path).start()
    try:
        yield running
    finally:
        running.stop()
