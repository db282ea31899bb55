"""`manage.py runingest`: NATS JetStream → PostgreSQL consumer (several copies may run)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from argus.runner import run_worker
from telemetry.consumer import IngestConsumer
from telemetry.followup import enqueue_followups


class Command(BaseCommand):
    help = "Consume telemetry from JetStream and store it in PostgreSQL until SIGTERM/SIGINT."

    def handle(self, *args: Any, **options: Any) -> None:
        consumer = IngestConsumer(after_commit=enqueue_followups)
        run_worker("runingest", consumer, cache=consumer.profiles, metrics_port=settings.ARGUS_INGEST_METRICS_PORT)
