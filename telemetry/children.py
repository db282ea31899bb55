"""Gateway children: map the child ids of gateway messages to devices of the tenant, registering
unknown ones under their gateway where the device type allows, and refusing, child by child,
those the gateway may not speak for."""

from __future__ import annotations

import logging

from django.db import connection
from django.utils import timezone

from argus.registry import current_tenant
from devices.models import DeviceRole, DeviceStatus
from telemetry.messages import Prepared, safe_text
from telemetry.models import RawStatus
from telemetry.profiles import DEVICE_PROFILE_FIELDS, DeviceProfile, ProfileCache

log = logging.getLogger(__name__)


def resolve_children(prepared: list[Prepared], schema: str, profiles: ProfileCache) -> list[DeviceProfile]:
    """Map gateway children to device ids, registering unknown ones where the type allows.

    A child the gateway may not speak for (another tenant's device, another gateway's, or one
    not active) is refused on its own: its reading is left out and the raw row's reason names it,
    while the message's other children are stored. A message none of whose children can be stored
    is rejected.
    """
    gateway_items = [
        p
        for p in prepared
        if p.status == RawStatus.ACCEPTED
        and p.decoded is not None
        and p.decoded.readings[:1]
        and p.decoded.readings[0].child_id
    ]
    if not gateway_items:
        return []
    wanted = sorted({r.child_id for p in gateway_items for r in p.decoded.readings if r.child_id})  # type: ignore[union-attr]
    known = profiles.devices(schema, wanted)
    to_register: dict[str, Prepared] = {}
    for item in gateway_items:
        assert item.decoded is not None and item.device is not None and item.device_type is not None
        unknown = [r.child_id for r in item.decoded.readings if r.child_id not in known]
        if unknown and not item.device_type.auto_register_children:
            item.reject(f"unknown child device {unknown[0]} (automatic registration is off for this type)")
            continue
        for child_id in unknown:
            to_register.setdefault(child_id, item)  # type: ignore[arg-type]
    registered, foreign = _register_children(schema, to_register)
    known.update({p.logical_identifier: p for p in registered})
    for item in gateway_items:
        if item.status != RawStatus.ACCEPTED:
            continue
        assert item.decoded is not None and item.device is not None
        refusals: dict[str, str] = {}
        for index, reading in enumerate(item.decoded.readings):
            child_id = reading.child_id or ""
            child = known.get(child_id)
            if child is None:
                problem = "is owned by another tenant" if child_id in foreign else "could not be registered"
            elif child.parent_device_id != item.device.id:
                problem = "belongs to another gateway"
            elif child.status != DeviceStatus.ACTIVE:
                problem = f"is {child.status}"
            else:
                item.rows.append((child.id, reading.time, reading.values))
                continue
            item.refused.append(index)
            refusals.setdefault(child_id, problem)
        if refusals:
            listed = "; ".join(f"child device {c} {problem}" for c, problem in list(refusals.items())[:10])
            if len(refusals) > 10:
                listed += f"; and {len(refusals) - 10} more"
            if item.rows:
                item.reason = safe_text(f"{len(refusals)} of the children refused: {listed}")
            else:
                item.reject(listed)
    return registered


def _register_children(schema: str, to_register: dict[str, Prepared]) -> tuple[list[DeviceProfile], set[str]]:
    """Register unknown children under their gateways in the current transaction.

    Returns the profiles of the children now ours, and the ids another tenant owns. The claim is
    the insert into the public registry, whose unique logical identifier settles every race: of
    two transactions registering one id (two tenants' gateways, two ingest processes), the second
    waits for the first to commit, then finds the id taken. (Checking the registry first and
    writing it last let two tenants both create the device and store its readings.)
    """
    if not to_register:
        return [], set()
    tenant = current_tenant()
    with connection.cursor() as cursor:
        # In a fixed order, so two transactions claiming overlapping ids cannot deadlock.
        cursor.execute(
            """
            INSERT INTO public.device_registry (logical_identifier, tenant_id, device_id, created_at)
            SELECT l, %s, nextval(pg_get_serial_sequence('devices', 'id')), now()
            FROM unnest(%s::text[]) AS v(l) ORDER BY l
            ON CONFLICT (logical_identifier) DO NOTHING
            RETURNING logical_identifier, device_id
            """,
            [tenant.pk, sorted(to_register)],
        )
        claimed: dict[str, int] = dict(cursor.fetchall())
        others = [i for i in to_register if i not in claimed]
        foreign: set[str] = set()
        if others:
            cursor.execute(
                "SELECT logical_identifier FROM public.device_registry "
                "WHERE logical_identifier = ANY(%s) AND tenant_id <> %s",
                [others, tenant.pk],
            )
            foreign = {row[0] for row in cursor.fetchall()}
        if claimed:
            gateways = [to_register[i] for i in claimed]
            now = timezone.now()
            cursor.execute(
                """
                INSERT INTO devices (id, device_type_id, name, logical_identifier, device_role, parent_device_id,
                                     network_metadata, protocol, status, metadata, created_at, updated_at)
                SELECT i, t, l, l, %s, p, '{"auto_registered": true}'::jsonb, 'mqtt', 'active', '{}'::jsonb, %s, %s
                FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::bigint[]) AS v(i, t, l, p)
                ON CONFLICT (logical_identifier) DO NOTHING
                """,
                [
                    DeviceRole.CHILD,
                    now,
                    now,
                    list(claimed.values()),
                    [g.device_type.child_device_type_id or g.device_type.id for g in gateways],  # type: ignore[union-attr]
                    list(claimed),
                    [g.device.id for g in gateways],  # type: ignore[union-attr]
                ],
            )
        # Ours: claimed just now, or by another transaction of this tenant that committed while
        # our claim waited for it.
        mine = [i for i in to_register if i not in foreign]
        cursor.execute(
            f"SELECT {', '.join(DEVICE_PROFILE_FIELDS)} FROM devices WHERE logical_identifier = ANY(%s)", [mine]
        )
        profiles = [DeviceProfile(*row) for row in cursor.fetchall()]
        # A device row that existed without its registry row keeps its id; the registry follows it.
        moved = [(p.logical_identifier, p.id) for p in profiles if claimed.get(p.logical_identifier, p.id) != p.id]
        if moved:
            cursor.execute(
                "UPDATE public.device_registry r SET device_id = v.d FROM unnest(%s::text[], %s::bigint[]) AS v(l, d) "
                "WHERE r.logical_identifier = v.l AND r.tenant_id = %s",
                [[m[0] for m in moved], [m[1] for m in moved], tenant.pk],
            )
    log.info("children registered schema=%s count=%d refused=%d", schema, len(claimed), len(foreign))
    return profiles, foreign
