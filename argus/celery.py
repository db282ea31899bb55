"""The Celery app: tenant-aware (each task runs in the schema it was sent from), with task metrics
and the worker's probe server (argus/celery_metrics.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from celery.beat import PersistentScheduler
from celery.signals import worker_process_init
from tenant_schemas_celery.app import CeleryApp

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "argus.settings")
# prometheus-client opens its files there as each metric is created (multiprocess mode, see
# argus/celery_metrics.py): the directory must exist before the first module that defines one,
# and files of an earlier process with this pid (a restarted container's pid 1) must not be
# carried on: while prometheus-client is not imported, no file of that pid can be this process's.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    _metrics_dir.mkdir(parents=True, exist_ok=True)
    if "prometheus_client" not in sys.modules:
        for _stale in _metrics_dir.glob(f"*_{os.getpid()}.db"):
            _stale.unlink()

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
