"""The Celery app: tenant-aware (each task runs in the schema it was sent from)."""

from __future__ import annotations

import os
from pathlib import Path

from celery.beat import PersistentScheduler
from celery.signals import worker_process_init
from tenant_schemas_celery.app import CeleryApp

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "argus.settings")

app = CeleryApp("argus")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Task counts and durations, and the worker's /metrics, /healthz, /readyz (signal handlers).
from argus import celery_metrics  # noqa: E402, F401


@worker_process_init.connect
def _start_worker_process(**kwargs: object) -> None:
    from argus.invalidation import start_process_listeners
    from argus.runner import freeze_startup_objects

    start_process_listeners()
    freeze_startup_objects()


class BeatScheduler(PersistentScheduler):
    """Celery beat's default scheduler, with its state file's directory created first: the file
    lives under `.run/` in a checkout (CELERY_BEAT_SCHEDULE_FILENAME), not beside manage.py."""

    def setup_schedule(self) -> None:
        Path(self.schedule_filename).parent.mkdir(parents=True, exist_ok=True)
        super().setup_schedule()
