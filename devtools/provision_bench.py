"""Bulk provisioning benchmark (issue 15): `manage.py provision` on a file of 10,000 devices.

    DEBUG=1 .venv/bin/python -m devtools.provision_bench      (make provision-bench)

Tenant `provisionbench` gets a gateway type and an endpoint type; a CSV of PROVISION_BENCH_DEVICES
rows (a tenth gateways, each with nine children named after it, all in one file, children
before their gateways) is provisioned three times through the command, each run timed whole:
into an empty tenant (all created), again unchanged, and with every name changed (all updated).
The devices are deleted afterwards. The last line is one JSON object; it exits non-zero when a
run refuses a row, reports other counts than expected, or takes longer than 60 s.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "argus.settings")
django.setup()

from django.core.management import call_command  # noqa: E402
from django.core.management.base import CommandError  # noqa: E402
from django_tenants.utils import schema_context  # noqa: E402

from argus.models import DeviceRegistration  # noqa: E402
from devices.models import Device, DeviceType, ProcessingMode  # noqa: E402
from devtools.bench import ensure_tenant, machine_description, migrate_database  # noqa: E402

SCHEMA = "provisionbench"
GOAL_SECONDS = 60.0


def log(text: str) -> None:
    print(f"provision-bench: {text}", flush=True)


def fleet_csv(devices: int, suffix: str = "") -> bytes:
    """Groups of ten rows: nine children, then their gateway; a remainder as plain endpoints."""
    lines = ["logical_identifier,name,device_type,parent,metadata"]
    for g in range(devices // 10):
        gateway = f"PB-GW-{g:05d}"
        lines += [f'PB-CH-{g:05d}-{c},beacon {c}{suffix},pb-beacon,{gateway},"{{""slot"": {c}}}"' for c in range(9)]
        lines.append(f"{gateway},hub {g}{suffix},pb-hub,,")
    lines += [f"PB-EP-{i:05d},endpoint {i}{suffix},pb-beacon,," for i in range(devices % 10)]
    return ("\n".join(lines) + "\n").encode()


def ensure_types() -> None:
    with schema_context(SCHEMA):
        for name, mode in (("pb-hub", ProcessingMode.GATEWAY), ("pb-beacon", ProcessingMode.ENDPOINT)):
            if not DeviceType.objects.filter(name=name).exists():
                device_type = DeviceType(name=name, processing_mode=mode, metrics=["rssi"], message_schema={})
                device_type.full_clean()
                device_type.save()


def timed_run(path: Path) -> tuple[float, str]:
    out = io.StringIO()
    started = time.perf_counter()
    try:
        call_command("provision", str(path), schema=SCHEMA, stdout=out)
    except CommandError as exc:
        raise SystemExit(f"provision-bench: the command refused rows: {exc}\n{out.getvalue()[-2000:]}") from exc
    return time.perf_counter() - started, out.getvalue().splitlines()[-1]


def clear() -> None:
    with schema_context(SCHEMA):
        ids = list(Device.objects.values_list("pk", flat=True))
        Device.objects.filter(parent_device__isnull=False).delete()
        Device.objects.all().delete()
    DeviceRegistration.objects.filter(tenant__schema_name=SCHEMA, device_id__in=ids).delete()


def main() -> int:
    devices = int(os.environ.get("PROVISION_BENCH_DEVICES", "10000"))
    migrate_database(log)
    ensure_tenant(SCHEMA, "Provisioning benchmark", log)
    ensure_types()
    clear()
    report: dict[str, Any] = {"devices": devices, "machine": machine_description()}
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        first, renamed = Path(tmp) / "fleet.csv", Path(tmp) / "renamed.csv"
        first.write_bytes(fleet_csv(devices))
        renamed.write_bytes(fleet_csv(devices, suffix=" (renamed)"))
        try:
            for run, path, expected in (
                ("create", first, f"{devices} rows: {devices} created, 0 updated, 0 unchanged, 0 refused"),
                ("unchanged", first, f"{devices} rows: 0 created, 0 updated, {devices} unchanged, 0 refused"),
                ("update", renamed, f"{devices} rows: 0 created, {devices} updated, 0 unchanged, 0 refused"),
            ):
                seconds, summary = timed_run(path)
                log(f"{run}: {seconds:.2f} s ({devices / seconds:,.0f} devices/s): {summary}")
                report[f"{run}_seconds"] = round(seconds, 2)
                if summary != expected:
                    problems.append(f"{run}: {summary!r}, expected {expected!r}")
                if seconds > GOAL_SECONDS:
                    problems.append(f"{run}: {seconds:.1f} s, more than {GOAL_SECONDS:.0f} s")
            with schema_context(SCHEMA):
                report["stored"] = Device.objects.count()
                report["children_with_parent"] = Device.objects.filter(parent_device__isnull=False).count()
        finally:
            clear()
    if report.get("stored") != devices:
        problems.append(f"stored {report.get('stored')} devices, expected {devices}")
    report["problems"] = problems
    print(json.dumps(report))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
