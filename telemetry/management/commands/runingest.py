"""`manage.py runingest`: NATS JetStream → PostgreSQL consumer (several copies may run)."""

from __future__ import annotations

import asyncio
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from argus.runner import run_until_stopped
from telemetry.consumer import IngestConsumer
from telemetry.followup import enqueue_followups
from telemetry.profiles import InvalidationListener


class Command(BaseCommand):
    help = "Consume telemetry from JetStream and store it in PostgreSQL until SIGTERM/SIGINT."

    def handle(self, *args: Any, **options: Any) -> None:
        consumer = IngestConsumer(after_commit=enqueue_followups)
        listener = InvalidationListener(consumer.profiles)
        listener.start()
        asyncio.run(
            run_until_stopped(
                "runingest",
                start=consumer.start,
                step=consumer.step,
                close=consumer.close,
                metrics_port=settings.ARGUS_INGEST_METRICS_PORT,
            )
        )
        listener.stop()
