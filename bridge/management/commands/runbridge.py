"""`manage.py runbridge`: MQTT → NATS JetStream bridge."""

from __future__ import annotations

import asyncio
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from argus.runner import run_until_stopped
from bridge.bridge import MqttBridge
from telemetry.profiles import InvalidationListener


class Command(BaseCommand):
    help = "Forward device messages from MQTT to JetStream until SIGTERM/SIGINT, then drain and exit 0."

    def handle(self, *args: Any, **options: Any) -> None:
        bridge = MqttBridge()
        listener = InvalidationListener(bridge.routes)
        listener.start()
        asyncio.run(
            run_until_stopped(
                "runbridge",
                start=bridge.start,
                step=bridge.step,
                close=bridge.close,
                metrics_port=settings.ARGUS_BRIDGE_METRICS_PORT,
            )
        )
        listener.stop()
