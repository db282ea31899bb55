"""`manage.py bench`: end-to-end pipeline benchmark (logic in devtools.bench; `make bench` runs it)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from devtools.bench import BenchRun, BenchSettings, failures, human_summary, run_and_report
from devtools.supervisor import ChildError


class Command(BaseCommand):
    help = (
        "Offer BENCH_RATE msgs/s (0 = flat out) for BENCH_SECONDS through a private Mosquitto, runbridge, "
        "JetStream and runingest into tenant 'bench', then the same load through a bare chain of the same parts "
        "(BENCH_BASELINE=1: only that, 0: skip it); print a summary and, last, one JSON line. "
        "Exits non-zero when anything is lost, duplicated, rejected or not drained."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            bench = BenchRun(BenchSettings.from_env(), self.stdout)
        except (ChildError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        run_and_report(bench, self.stdout, summary=human_summary, problems_of=failures)
