"""Bulk provisioning: devices of one tenant from a CSV or JSON file (`manage.py provision`, the
device admin's import).

Every row is validated before anything is written; the valid rows are then written in one
transaction (with `all_or_nothing`, nothing when any row is refused). The report says for each
row what was created, updated, left unchanged or refused and why. Rows name their device type
by name, their gateway (`parent`) by logical id — a device of the tenant or another row of the
file — and the assets they feed by name. A file is a tenant admin's input: its size, its JSON
and every field are bounded, and an id another tenant holds is refused like any taken id.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone
from rest_framework import serializers

from argus.api import bounded_json
from argus.models import DeviceRegistration
from argus.registry import current_schema, registry_sync
from assets.models import Asset, AssetDevice
from devices.models import Device, DeviceRole, DeviceType, ProcessingMode

log = logging.getLogger(__name__)

COLUMNS = ("logical_identifier", "name", "device_type", "parent", "metadata", "assets")
REQUIRED = ("logical_identifier", "device_type")
# Asset names in a CSV cell: separated by this (a name containing it is written in JSON files).
ASSET_SEPARATOR = ";"
GATEWAY_MODES = {ProcessingMode.GATEWAY, ProcessingMode.GATEWAY_CHUNKED}
# The registry is written in statements of this many rows (PostgreSQL takes at most 65,535
# parameters in one; three per row).
REGISTRY_BATCH = 5000


class ProvisionFileError(ValueError):
    """The file as a whole cannot be read (format, columns, size)."""


@dataclass
class RowOutcome:
    """What became of one row of the file."""

    row: int  # 1: the first device of the file (a CSV's line 2)
    logical_identifier: str
    action: str = ""  # created | updated | unchanged | refused
    errors: dict[str, list[str]] = field(default_factory=dict)
    device: Device | None = None

    def refuse(self, column: str, message: str) -> None:
        self.errors.setdefault(column, []).append(message)


@dataclass
class ProvisionReport:
    """Every row's outcome, and whether anything was written."""

    outcomes: list[RowOutcome]
    written: bool

    def count(self, action: str) -> int:
        return sum(1 for o in self.outcomes if o.action == action)

    @property
    def refused(self) -> list[RowOutcome]:
        return [o for o in self.outcomes if o.action == "refused"]

    def summary(self) -> str:
        counts = ", ".join(f"{self.count(a)} {a}" for a in ("created", "updated", "unchanged", "refused"))
        return f"{len(self.outcomes)} rows: {counts}" + ("" if self.written else "; nothing written")


# --------------------------------------------------------------------------- reading files


def read_rows(data: bytes, *, fmt: str) -> list[dict[str, Any]]:
    """The rows of a CSV (a header line naming COLUMNS) or JSON file (a list of objects)."""
    if len(data) > settings.ARGUS_PROVISION_MAX_BYTES:
        raise ProvisionFileError(f"The file is larger than {settings.ARGUS_PROVISION_MAX_BYTES} bytes.")
    if fmt == "json":
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ProvisionFileError(f"Not JSON: {exc}") from None
        if not isinstance(document, list) or not all(isinstance(row, dict) for row in document):
            raise ProvisionFileError("A JSON file holds a list of objects, one per device.")
        rows: list[dict[str, Any]] = document
    elif fmt == "csv":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ProvisionFileError("A CSV file must be UTF-8.") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [dict(row) for row in reader]
        if None in {key for row in rows for key in row}:
            raise ProvisionFileError("A row has more cells than the header has columns.")
    else:
        raise ProvisionFileError("The format is csv or json.")
    check_row_count(rows, headers={key for row in rows for key in row})
    return rows


def check_row_count(rows: Sequence[dict[str, Any]], *, headers: Iterable[Any]) -> None:
    """The bounds of a file read by anyone (this module, the admin's import): rows and columns."""
    if len(rows) > settings.ARGUS_PROVISION_MAX_ROWS:
        raise ProvisionFileError(f"At most {settings.ARGUS_PROVISION_MAX_ROWS} rows per file.")
    unknown = sorted({str(key) for key in headers} - set(COLUMNS))
    if unknown:
        raise ProvisionFileError(f"Unknown columns: {', '.join(unknown)} (known: {', '.join(COLUMNS)}).")


# --------------------------------------------------------------------------- validating


@dataclass
class _Planned:
    outcome: RowOutcome
    name: str
    device_type: DeviceType
    parent: str
    metadata: dict[str, Any]
    assets: list[Asset]


def _text(row: dict[str, Any], column: str, outcome: RowOutcome) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        outcome.refuse(column, "Expected text.")
        return ""
    return value.strip()


def _metadata(row: dict[str, Any], outcome: RowOutcome) -> dict[str, Any]:
    value = row.get("metadata")
    if value in (None, ""):
        return {}
    if isinstance(value, str):  # a CSV cell holds JSON text
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            outcome.refuse("metadata", "Not a JSON object.")
            return {}
    try:
        result: dict[str, Any] = bounded_json(value)
    except serializers.ValidationError as exc:
        outcome.refuse("metadata", " ".join(str(e) for e in exc.detail))
        return {}
    return result


def _asset_names(row: dict[str, Any], outcome: RowOutcome) -> list[str]:
    value = row.get("assets")
    if value in (None, ""):
        return []
    if isinstance(value, str):
        names = [name.strip() for name in value.split(ASSET_SEPARATOR)]
    elif isinstance(value, list) and all(isinstance(name, str) for name in value):
        names = [name.strip() for name in value]
    else:
        outcome.refuse("assets", "Asset names: a list, or separated by ';' in a CSV cell.")
        return []
    if len(names) > settings.ARGUS_PROVISION_MAX_ASSETS_PER_DEVICE:
        outcome.refuse("assets", f"At most {settings.ARGUS_PROVISION_MAX_ASSETS_PER_DEVICE} assets per device.")
        return []
    return [name for name in names if name]


def _field_errors(device: Device) -> dict[str, list[str]]:
    # Relations and uniqueness are checked in bulk below, not one query per row.
    try:
        device.clean_fields(exclude=["device_type", "parent_device"])
    except ValidationError as exc:
        return dict(exc.message_dict)
    return {}


def _plan(rows: Sequence[dict[str, Any]]) -> tuple[list[_Planned], list[RowOutcome]]:
    types = {t.name: t for t in DeviceType.objects.all()}
    outcomes = [RowOutcome(row=number, logical_identifier="") for number in range(1, len(rows) + 1)]
    texts = [
        {c: _text(row, c, outcome) for c in ("logical_identifier", "name", "device_type", "parent")}
        for row, outcome in zip(rows, outcomes, strict=True)
    ]
    metadata = [_metadata(row, outcome) for row, outcome in zip(rows, outcomes, strict=True)]
    asset_names = [_asset_names(row, outcome) for row, outcome in zip(rows, outcomes, strict=True)]
    assets = {a.name: a for a in Asset.objects.filter(name__in={n for names in asset_names for n in names})}
    planned: list[_Planned] = []
    seen: set[str] = set()
    for text, meta, names, outcome in zip(texts, metadata, asset_names, outcomes, strict=True):
        logical_id = outcome.logical_identifier = text["logical_identifier"]
        for column in REQUIRED:
            if not text[column]:
                outcome.refuse(column, "Required.")
        if logical_id and logical_id in seen:
            outcome.refuse("logical_identifier", "Appears more than once in the file.")
        seen.add(logical_id)
        device_type = types.get(text["device_type"])
        if text["device_type"] and device_type is None:
            outcome.refuse("device_type", f"No device type named {text['device_type']!r}.")
        if text["parent"] and text["parent"] == logical_id:
            outcome.refuse("parent", "A device cannot be its own parent.")
        for name in names:
            if name not in assets:
                outcome.refuse("assets", f"No asset named {name!r}.")
        name = text["name"] or logical_id
        if logical_id:  # without one, "Required." says it all
            for column, messages in _field_errors(Device(logical_identifier=logical_id, name=name)).items():
                outcome.errors.setdefault(column, []).extend(messages)
        if device_type is not None:
            linked = [assets[n] for n in names if n in assets]
            planned.append(_Planned(outcome, name, device_type, text["parent"], meta, linked))
    return planned, outcomes


def _check_identities(planned: list[_Planned], existing: dict[str, Device]) -> None:
    """Refuse ids another tenant holds (without saying which), and parents that are nowhere."""
    ids = [p.outcome.logical_identifier for p in planned]
    schema = current_schema()
    taken = set(
        DeviceRegistration.objects.filter(logical_identifier__in=ids)
        .exclude(tenant__schema_name=schema)
        .values_list("logical_identifier", flat=True)
    )
    in_file: dict[str, _Planned] = {}
    for p in planned:
        in_file.setdefault(p.outcome.logical_identifier, p)  # a repeated id's later rows are refused
    for p in planned:
        if p.outcome.logical_identifier in taken:
            p.outcome.refuse("logical_identifier", "This logical identifier is already used on this platform.")
        if p.parent and p.parent not in existing and p.parent not in in_file:
            p.outcome.refuse("parent", f"No device {p.parent!r} in this tenant or this file.")
    # A child whose gateway row is refused is refused too; repeat until nothing changes (chains).
    changed = True
    while changed:
        changed = False
        for p in planned:
            parent = in_file.get(p.parent) if p.parent else None
            if parent is not None and parent.outcome.errors and not p.outcome.errors:
                p.outcome.refuse("parent", f"The row of its gateway {p.parent!r} is refused.")
                changed = True
    # Cycles within the file (a is b's parent, b is a's) never reach a device that exists.
    for p in planned:
        seen, at = {p.outcome.logical_identifier}, p.parent
        while at and at in in_file and at not in existing:
            if at in seen:
                p.outcome.refuse("parent", "Its gateways form a cycle.")
                break
            seen.add(at)
            at = in_file[at].parent


# --------------------------------------------------------------------------- writing


def devices_provision(
    *, rows: Sequence[dict[str, Any]], all_or_nothing: bool = False, dry_run: bool = False
) -> ProvisionReport:
    """Validate every row, then write the valid ones (devices, their registry rows, their asset
    links) in one transaction; the current schema is the tenant's."""
    planned, outcomes = _plan(rows)
    ids = [p.outcome.logical_identifier for p in planned]
    parents = [p.parent for p in planned if p.parent]
    existing = {
        d.logical_identifier: d
        for d in Device.objects.filter(logical_identifier__in=[*ids, *parents]).select_related("parent_device")
    }
    _check_identities(planned, existing)
    for outcome in outcomes:
        if outcome.errors:
            outcome.action = "refused"
    valid = [p for p in planned if not p.outcome.errors]
    for p in valid:
        device = existing.get(p.outcome.logical_identifier)
        p.outcome.device = device
        p.outcome.action = "created" if device is None else "unchanged" if _same(device, p) else "updated"
    if dry_run or (all_or_nothing and len(valid) != len(outcomes)) or not valid:
        return ProvisionReport(outcomes, written=False)
    with transaction.atomic():
        _write(valid, existing)
    log.info("provisioned %d devices in %s (%d refused)", len(valid), current_schema(), len(outcomes) - len(valid))
    return ProvisionReport(outcomes, written=True)


def _same(device: Device, p: _Planned) -> bool:
    """Whether the row asks for what the device already is."""
    parent = device.parent_device.logical_identifier if device.parent_device else ""
    return (device.name, device.device_type_id, device.device_role, parent, device.metadata) == (
        p.name,
        p.device_type.pk,
        _role(p),
        p.parent,
        p.metadata,
    )


def _role(p: _Planned) -> str:
    if p.parent:
        return DeviceRole.CHILD
    return DeviceRole.GATEWAY if p.device_type.processing_mode in GATEWAY_MODES else DeviceRole.STANDALONE


def _write(valid: list[_Planned], existing: dict[str, Device]) -> None:
    devices = dict(existing)
    # Lock the rows this file updates, so a concurrent edit is not overwritten unseen.
    list(Device.objects.select_for_update().filter(pk__in=[d.pk for d in existing.values()]).values_list("pk"))
    pending = [p for p in valid if p.outcome.action == "created"]
    # New devices in waves: those whose gateway exists already, then their children, and so on
    # (cycles and missing gateways were refused, so every wave has rows).
    while pending:
        wave = [p for p in pending if not p.parent or p.parent in devices]
        if not wave:
            raise RuntimeError("provisioning: gateways neither exist nor are created")  # refused above
        created = Device.objects.bulk_create(
            [
                Device(
                    logical_identifier=p.outcome.logical_identifier,
                    name=p.name,
                    device_type=p.device_type,
                    device_role=_role(p),
                    parent_device=devices[p.parent] if p.parent else None,
                    metadata=p.metadata,
                )
                for p in wave
            ]
        )
        for p, device in zip(wave, created, strict=True):
            devices[p.outcome.logical_identifier] = p.outcome.device = device
        pending = [p for p in pending if p.outcome.logical_identifier not in devices]
    _update([p for p in valid if p.outcome.action == "updated"], devices)
    # bulk_create skips Device.save(): register the new ids platform-wide, in bounded statements.
    new_devices = [p.outcome.device for p in valid if p.outcome.action == "created" and p.outcome.device]
    for start in range(0, len(new_devices), REGISTRY_BATCH):
        registry_sync(devices=new_devices[start : start + REGISTRY_BATCH])
    AssetDevice.objects.bulk_create(
        [AssetDevice(asset=a, device=p.outcome.device) for p in valid if p.outcome.device for a in p.assets],
        ignore_conflicts=True,
    )


def _update(rows: list[_Planned], devices: dict[str, Device]) -> None:
    """Update the rows' devices in one statement. (Django's bulk_update builds a CASE per field
    and row: 22 s for 10,000 devices on the benchmark, where this takes well under one.)"""
    if not rows:
        return
    ids, names, types, roles, parents, metadata = [], [], [], [], [], []
    for p in rows:
        ids.append(devices[p.outcome.logical_identifier].pk)
        names.append(p.name)
        types.append(p.device_type.pk)
        roles.append(_role(p))
        parents.append(devices[p.parent].pk if p.parent else None)
        metadata.append(orjson.dumps(p.metadata).decode())
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            UPDATE {Device._meta.db_table} AS d
               SET name = v.name, device_type_id = v.type_id, device_role = v.role,
                   parent_device_id = v.parent_id, metadata = v.metadata::jsonb, updated_at = %s
              FROM unnest(%s::bigint[], %s::text[], %s::bigint[], %s::text[], %s::bigint[], %s::text[])
                   AS v(id, name, type_id, role, parent_id, metadata)
             WHERE d.id = v.id
            """,
            [timezone.now(), ids, names, types, roles, parents, metadata],
        )
    for p in rows:
        device = devices[p.outcome.logical_identifier]
        device.name, device.device_type, device.device_role = p.name, p.device_type, _role(p)
        device.parent_device, device.metadata = (devices[p.parent] if p.parent else None), p.metadata


def outcome_lines(outcomes: Iterable[RowOutcome]) -> list[str]:
    """One line per row: `row N  ID  action  [column: reason; ...]`."""
    lines = []
    for o in outcomes:
        reasons = "; ".join(f"{column}: {' '.join(messages)}" for column, messages in o.errors.items())
        lines.append(f"row {o.row}  {o.logical_identifier or '-'}  {o.action}" + (f"  {reasons}" if reasons else ""))
    return lines
