"""The public device registry: logical identifier -> tenant, kept in step with tenant devices."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import IntegrityError, connection
from django_tenants.utils import get_public_schema_name, schema_context

from argus.identity import is_reserved_identifier
from argus.models import DeviceRegistration, Organization

if TYPE_CHECKING:
    from devices.models import Device


def current_schema() -> str:
    """The schema the connection is using (django-tenants keeps it on the connection)."""
    return str(getattr(connection, "schema_name", "public"))


def in_schema(schema: str) -> contextlib.AbstractContextManager[object]:
    """django-tenants' schema_context(schema), or nothing when the connection is already in that
    schema: every switch, and the switch back, costs a `SET search_path` before the next statement
    (an HTTP ingest request, routed to its tenant by its host, switched to it twice more)."""
    if current_schema() == schema:
        return contextlib.nullcontext()
    return schema_context(schema)


def use_public_schema() -> None:
    """Point the connection back at the public schema."""
    connection.set_schema_to_public()  # type: ignore[attr-defined]


def each_tenant_schema() -> Iterator[str]:
    """Every tenant's schema name, with the connection in that schema while the caller's loop body
    runs (the public schema again afterwards)."""
    schemas = list(
        Organization.objects.exclude(schema_name=get_public_schema_name()).values_list("schema_name", flat=True)
    )
    for schema in schemas:
        with schema_context(schema):
            yield schema


def current_tenant() -> Organization:
    """The organization whose schema the connection is using."""
    tenant = getattr(connection, "tenant", None)
    if isinstance(tenant, Organization):
        return tenant
    return Organization.objects.get(schema_name=current_schema())


def registry_sync(*, devices: Iterable[Device]) -> None:
    """Insert or update the registry rows of devices of the current tenant (one statement)."""
    devices = list(devices)
    services = [settings.ARGUS_BRIDGE_CLIENT_ID]
    reserved = [d.logical_identifier for d in devices if is_reserved_identifier(d.logical_identifier, services)]
    if reserved:
        # Checked here too, not only in form validation: no path may register a service's name.
        raise IntegrityError(f"Reserved for a platform service: {', '.join(reserved)}")
    tenant = current_tenant()
    rows = [DeviceRegistration(logical_identifier=d.logical_identifier, tenant=tenant, device_id=d.pk) for d in devices]
    if not rows:
        return
    # A renamed device keeps its registry row keyed by (tenant, device_id).
    DeviceRegistration.objects.filter(tenant=tenant, device_id__in=[r.device_id for r in rows]).exclude(
        logical_identifier__in=[r.logical_identifier for r in rows]
    ).delete()
    # Upsert, but never take over another tenant's identifier: such a row is left alone and
    # counted missing, which raises.
    values = ", ".join(["(%s, %s, %s, now())"] * len(rows))
    params: list[str | int] = []
    for r in rows:
        params += [r.logical_identifier, tenant.pk, r.device_id]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO public.device_registry (logical_identifier, tenant_id, device_id, created_at) "
            f"VALUES {values} ON CONFLICT (logical_identifier) DO UPDATE SET device_id = EXCLUDED.device_id "
            f"WHERE device_registry.tenant_id = EXCLUDED.tenant_id",
            params,
        )
        if cursor.rowcount != len(rows):
            raise IntegrityError("A logical identifier is already registered to another tenant.")


def registry_remove(*, device_ids: Iterable[int]) -> None:
    """Remove the registry rows of devices of the current tenant."""
    DeviceRegistration.objects.filter(tenant=current_tenant(), device_id__in=list(device_ids)).delete()


def registry_lookup(logical_identifier: str) -> str | None:
    """The schema name of the tenant owning a logical identifier, or None."""
    row = (
        DeviceRegistration.objects.filter(logical_identifier=logical_identifier)
        .values_list("tenant__schema_name", flat=True)
        .first()
    )
    return row


def registry_route(logical_identifier: str) -> tuple[str, int] | None:
    """(schema of the owning tenant, device id) of a logical identifier, or None."""
    row = (
        DeviceRegistration.objects.filter(logical_identifier=logical_identifier)
        .values_list("tenant__schema_name", "device_id")
        .first()
    )
    return (str(row[0]), int(row[1])) if row else None
