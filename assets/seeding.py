"""Loads the demo tenant and its IoT profiles from `fixtures/iot_seed.json`, idempotently."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import models, transaction
from django_tenants.utils import schema_context

from argus.models import Domain, Organization
from assets.models import Asset, AssetDevice, AssetType, ThresholdRule
from devices.models import Device, DeviceType

DEFAULT_FIXTURE = Path(settings.BASE_DIR) / "fixtures" / "iot_seed.json"


@dataclass
class SeedReport:
    """What a seed run created (an empty `created` list means it changed nothing)."""

    schema_name: str
    domains: list[str]
    admin_username: str
    admin_password: str | None
    created: list[str] = field(default_factory=list)


def _get_or_create(model: type[models.Model], report: SeedReport, lookup: dict[str, Any], **values: Any) -> Any:
    # Existing rows are left exactly as they are: an operator's edits survive a re-seed.
    obj = model._default_manager.filter(**lookup).first()
    if obj is not None:
        return obj
    obj = model(**lookup, **values)
    obj.full_clean()
    obj.save()
    report.created.append(f"{model._meta.verbose_name} {obj}")
    return obj


def seed_iot(*, fixture_path: Path = DEFAULT_FIXTURE, admin_password: str) -> SeedReport:
    """Create the demo tenant, its device and asset types, devices, assets, rules and admin user."""
    data = json.loads(fixture_path.read_text())
    tenant_data = data["tenant"]
    report = SeedReport(
        schema_name=tenant_data["schema_name"],
        domains=tenant_data["domains"],
        admin_username=data["admin"]["username"],
        admin_password=None,
    )
    tenant = Organization.objects.filter(schema_name=tenant_data["schema_name"]).first()
    if tenant is None:
        # Creating the tenant creates and migrates its schema; it cannot share a transaction.
        tenant = Organization.objects.create(schema_name=tenant_data["schema_name"], name=tenant_data["name"])
        report.created.append(f"organization {tenant}")
    for index, domain in enumerate(tenant_data["domains"]):
        if not Domain.objects.filter(domain=domain).exists():
            Domain.objects.create(domain=domain, tenant=tenant, is_primary=index == 0)
            report.created.append(f"domain {domain}")

    with schema_context(tenant.schema_name), transaction.atomic():
        _seed_tenant(data, report, admin_password)
    return report


def _seed_tenant(data: dict[str, Any], report: SeedReport, admin_password: str) -> None:
    device_types: dict[str, DeviceType] = {}
    for spec in data["device_types"]:
        name = spec.pop("name")
        device_types[name] = _get_or_create(DeviceType, report, {"name": name}, **spec)

    asset_types: dict[str, AssetType] = {}
    for spec in data["asset_types"]:
        name = spec.pop("name")
        asset_types[name] = _get_or_create(AssetType, report, {"name": name}, **spec)

    devices: dict[str, Device] = {}
    for spec in data["devices"]:
        spec = dict(spec)
        spec["device_type"] = device_types[spec["device_type"]]
        logical_id = spec.pop("logical_identifier")
        devices[logical_id] = _get_or_create(Device, report, {"logical_identifier": logical_id}, **spec)

    for spec in data["assets"]:
        spec = dict(spec)
        linked = spec.pop("devices", [])
        spec["asset_type"] = asset_types[spec["asset_type"]]
        spec["health_score"] = Decimal(spec["health_score"]) if spec.get("health_score") else None
        asset = _get_or_create(Asset, report, {"name": spec.pop("name")}, **spec)
        for logical_id in linked:
            _get_or_create(AssetDevice, report, {"asset": asset, "device": devices[logical_id]})

    for spec in data["threshold_rules"]:
        spec = dict(spec)
        spec["asset_type"] = asset_types[spec["asset_type"]]
        _get_or_create(ThresholdRule, report, {"name": spec.pop("name")}, **spec)

    user_model = get_user_model()
    admin = data["admin"]
    if not user_model._default_manager.filter(username=admin["username"]).exists():
        user_model._default_manager.create_superuser(
            username=admin["username"], email=admin["email"], password=admin_password
        )
        report.admin_password = admin_password
        report.created.append(f"user {admin['username']}")
