"""`manage.py deadletters list|replay`: see and re-inject what no tenant could take (telemetry/deadletters.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.dateparse import parse_datetime

from telemetry.deadletters import deadletters_list, deadletters_replay, reason_codes


class Command(BaseCommand):
    help = (
        "List the dead letters (reason, device or topic, time, size, a payload preview) or replay them: "
        "publish each again where it belongs (its original subject, or the tenant of a device registered "
        "since) and delete it from the DEADLETTER stream. Replays are idempotent."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["list", "replay"])
        parser.add_argument("--reason", help="only this reason code, e.g. unknown_device or max_deliveries")
        parser.add_argument("--since", help="only those received from this time on (ISO 8601)")
        parser.add_argument("--limit", type=int, default=None, help="at most this many (list: 100, replay: 10000)")
        parser.add_argument("--dry-run", action="store_true", help="replay: say where each would go, change nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        since = _since(options["since"])
        if options["action"] == "list":
            letters = deadletters_list(reason=options["reason"], since=since, limit=options["limit"] or 100)
            for letter in letters:
                where = letter.device or letter.topic or letter.original_subject
                self.stdout.write(
                    f"{letter.sequence}\t{letter.received_at:%Y-%m-%d %H:%M:%S}\t{letter.reason_code}\t{where}\t"
                    f"{letter.size} B\t{letter.reason}\t{letter.preview(60)}"
                )
            summary = ", ".join(f"{code} {count}" for code, count in reason_codes(letters)) or "none"
            self.stdout.write(f"{len(letters)} dead letter(s): {summary}")
            return
        outcomes = deadletters_replay(
            reason=options["reason"], since=since, limit=options["limit"] or 10_000, dry_run=options["dry_run"]
        )
        for outcome in outcomes:
            self.stdout.write(f"{outcome.dead_letter.sequence}\t{outcome.dead_letter.reason_code}\t{outcome.detail}")
        done = sum(o.replayed for o in outcomes)
        self.stdout.write(f"replayed {done} of {len(outcomes)}; {len(outcomes) - done} left in DEADLETTER")


def _since(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = parse_datetime(value)
    if parsed is None or parsed.tzinfo is None:
        raise CommandError(f"--since must be an ISO 8601 time with its zone, e.g. 2026-12-01T10:00:00Z: {value!r}")
    return parsed
