"""`manage.py fleet_bench`: the fleet benchmark (logic in devtools.fleet_bench; `make fleet-bench` runs it)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from devtools.bench import run_and_report
from devtools.fleet_bench import FleetBench, FleetSettings, failures, human_summary


class Command(BaseCommand):
    help = (
        "FLEET_DEVICES devices (10000), each with its own mutual-TLS connection and certificate, publish every "
        "FLEET_INTERVAL s (10) for FLEET_SECONDS (120) through a private Mosquitto (the shipped config) and the "
        "pipeline; FLEET_STORM=1 restarts the broker meanwhile. Prints a summary and, last, one JSON line; exits "
        "non-zero when anything acknowledged is lost or duplicated, or a device did not (re)connect."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            bench = FleetBench(FleetSettings.from_env(), self.stdout)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        run_and_report(bench, self.stdout, summary=human_summary, problems_of=failures)
