"""`manage.py runbridge`: MQTT → NATS JetStream bridge."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from argus.runner import run_worker
from bridge.bridge import MqttBridge


class Command(BaseCommand):
    help = "Forward device messages from MQTT to JetStream until SIGTERM/SIGINT, then drain and exit 0."

    def handle(self, *args: Any, **options: Any) -> None:
        bridge = MqttBridge()
        run_worker("runbridge", bridge, cache=bridge.routes, metrics_port=settings.ARGUS_BRIDGE_METRICS_PORT)
