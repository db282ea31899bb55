"""`manage.py faults`: the fault suite (logic in devtools.faults; `make faults` runs it)."""

from __future__ import annotations

import os
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from devtools.faults import run_suite, selected, write_docs
from devtools.supervisor import ChildError


class Command(BaseCommand):
    help = (
        "Run each fault (FAULTS=name,name or --faults picks some) on real processes and servers, "
        "print one JSON line per fault; exits non-zero when any lost or duplicated an acknowledged message."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--faults", default=os.environ.get("FAULTS", ""), help="comma-separated names")
        parser.add_argument("--write-docs", action="store_true", help="update the table in docs/validation.md")

    def emit(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            faults = selected(options["faults"])
            outcomes = run_suite(
                faults,
                log=lambda text: self.stderr.write(f"faults: {text}"),
                emit=self.emit,
            )
        except ChildError as exc:
            raise CommandError(str(exc)) from exc
        if options["write_docs"]:
            write_docs(outcomes)
        if not all(o.passed for o in outcomes):
            raise SystemExit(1)
