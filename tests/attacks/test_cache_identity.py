"""Cached profiles belong to one database (issue 10, item 10).

The failure measured: a benchmark on a private database beside the machine's own, both on the
machine's Redis with a tenant schema of the same name, judged its endpoint messages by the other
database's cached device types (same schema, same ids: a chunked-gateway type) and rejected every
one. Here a second database on the same PostgreSQL server gets tenant `alpha` with the same
ids and other profiles; it caches them in the same Redis the real pipeline of the test database
uses. Each database must go on reading only its own, also after the second one is recreated
under the same name or restored in place from a dump.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from django.db import connection, connections
from django.db.migrations.recorder import MigrationRecorder
from django_tenants.utils import schema_context

from devices.models import Device, DeviceType, ProcessingMode
from devtools.services.postgres import _postgres_bindir
from telemetry.models import RawStatus, TelemetryRaw
from telemetry.profiles import DeviceProfile, ProfileCache, TypeProfile
from tests.conftest import TenantPersona, make_device, make_device_type, unique_id
from tests.pipeline import Pipeline, database_url, publisher, wait_for


def admin_sql(sql: str) -> None:
    """A statement on the server's maintenance database (CREATE/DROP DATABASE)."""
    url = database_url().rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


@contextmanager
def connected_to(database: str) -> Iterator[None]:
    """This thread's connection on another database of the server, as a process of it would be."""
    conn = connections["default"]
    saved = conn.settings_dict["NAME"]
    conn.close()
    conn.settings_dict["NAME"] = database
    try:
        yield
    finally:
        conn.close()
        conn.settings_dict["NAME"] = saved


def make_other_database(name: str, schema: str, device: Device, *, mode: str, type_name: str) -> None:
    """A database whose tenant `schema` has a device type and a device with `device`'s ids."""
    admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin_sql(f'CREATE DATABASE "{name}"')
    with connected_to(name):
        MigrationRecorder(connection).ensure_schema()  # public.django_migrations, as after migrate
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE SCHEMA "{schema}"')
        with schema_context(schema):
            with connection.schema_editor() as editor:
                editor.create_model(DeviceType)
                editor.create_model(Device)
            # bulk_create: no signals, so nothing is invalidated or registered on the way.
            DeviceType.objects.bulk_create(
                [DeviceType(pk=device.device_type_id, name=type_name, processing_mode=mode, metrics=["temperature"])]
            )
            Device.objects.bulk_create(
                [
                    Device(
                        pk=device.pk, device_type_id=device.device_type_id, logical_identifier=device.logical_identifier
                    )
                ]
            )


def profiles_in(database: str, schema: str, device: Device) -> tuple[DeviceProfile | None, TypeProfile | None]:
    """What a new process of `database` finds for `device`'s ids (through Redis, as every process does)."""
    with connected_to(database), schema_context(schema):
        cache = ProfileCache()
        return cache.device(schema, device.logical_identifier), cache.device_type(schema, device.device_type_id)


@pytest.fixture
def other_database() -> Iterator[str]:
    name = f"{connection.settings_dict['NAME']}_other_{unique_id('db').split('-')[1]}"
    try:
        yield name
    finally:
        admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.integration
def test_it_judges_messages_by_its_own_databases_profiles_beside_another_on_the_same_redis(
    pipeline: Pipeline, alpha: TenantPersona, other_database: str
) -> None:
    with schema_context(alpha.schema):
        device = make_device(make_device_type(metrics=["temperature"]))
    make_other_database(
        other_database, alpha.schema, device, mode=ProcessingMode.GATEWAY_CHUNKED, type_name="other chunked type"
    )
    theirs = profiles_in(other_database, alpha.schema, device)  # cached in Redis by "their" process
    assert theirs[1] is not None and theirs[1].processing_mode == ProcessingMode.GATEWAY_CHUNKED

    with publisher(pipeline.mqtt_url) as sender:
        for i in range(20):
            sender.send(device.logical_identifier, {"msg_id": f"m{i}", "values": {"temperature": 20 + i}})

    def rows() -> list[TelemetryRaw]:
        with schema_context(alpha.schema):
            return list(TelemetryRaw.objects.filter(logical_identifier=device.logical_identifier))

    stored = wait_for(lambda: len(r := rows()) == 20 and r, what="20 raw rows")
    assert {r.status for r in stored} == {RawStatus.ACCEPTED}, {r.reason for r in stored}

    # runingest has cached this database's profiles by now; the other still reads its own.
    theirs = profiles_in(other_database, alpha.schema, device)
    assert theirs[1] is not None and theirs[1].name == "other chunked type"
    with schema_context(alpha.schema):
        ours = ProfileCache().device_type(alpha.schema, device.device_type_id)
    assert ours is not None and ours.processing_mode == ProcessingMode.ENDPOINT


def test_it_forgets_a_database_recreated_or_restored_under_the_same_name(
    live_db: None, alpha: TenantPersona, other_database: str, tmp_path: Path
) -> None:
    with schema_context(alpha.schema):
        device = make_device(make_device_type())
    server = database_url().rsplit("/", 1)[0]

    def type_name() -> str | None:
        found = profiles_in(other_database, alpha.schema, device)[1]
        return found.name if found else None

    make_other_database(other_database, alpha.schema, device, mode=ProcessingMode.GATEWAY, type_name="first")
    dump = tmp_path / "first.dump"
    pg_dump = [str(_postgres_bindir() / "pg_dump"), "--format=custom", f"--file={dump}", f"{server}/{other_database}"]
    subprocess.run(pg_dump, check=True)
    assert type_name() == "first"

    make_other_database(other_database, alpha.schema, device, mode=ProcessingMode.GATEWAY, type_name="second")
    assert type_name() == "second"

    # Back to the dump, in place: same server, same database, same OID.
    pg_restore = [
        str(_postgres_bindir() / "pg_restore"),
        "--clean",
        "--if-exists",
        f"--dbname={server}/{other_database}",
    ]
    subprocess.run([*pg_restore, str(dump)], check=True)
    assert type_name() == "first"
