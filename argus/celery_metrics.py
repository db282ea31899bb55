"""Prometheus metrics of the Celery worker (tasks run by name and final state, how long they ran,
failures by exception type) and its probe server: /metrics, /healthz, /readyz on
ARGUS_CELERY_METRICS_PORT (argus/probes.py; 0 turns it off).

The worker runs the prefork pool: tasks run in child processes, which the pool replaces when
one dies, while the server has to live in the main process, which runs no task. So the worker
uses prometheus-client's multiprocess mode: with PROMETHEUS_MULTIPROC_DIR set (docker/compose.yaml,
`make demo`) every child writes its values to files there and the main process's /metrics adds
them up; the directory is emptied at start (worker_init, in the main process, before the pool
forks) and an exited child is marked dead. The solo and threads pools run tasks in the main
process and need no directory. Without it under prefork, /metrics would show no task at all, so
the worker says so at start.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from celery.signals import (
    task_failure,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_shutdown,
    worker_shutdown,
)
from django.conf import settings
from prometheus_client import Counter, Histogram, multiprocess

from argus.health import CheckResult, database_check, redis_check, run_checks
from argus.metrics import multiprocess_dir
from argus.probes import ProbeServer

log = logging.getLogger(__name__)

TASKS = Counter("argus_celery_tasks_total", "Celery tasks run, by task name and final state", ["task", "state"])
TASK_SECONDS = Histogram(
    "argus_celery_task_seconds",
    "Time a Celery task ran, by task name",
    ["task"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
FAILURES = Counter(
    "argus_celery_task_failures_total",
    "Celery tasks that raised, by task name and exception type",
    ["task", "exception"],
)

# Task id -> when it started, in the process (and thread) that runs it.
_started: dict[str, float] = {}
_server: ProbeServer | None = None
SINGLE_PROCESS_POOLS = ("solo", "threads")


@task_prerun.connect
def _task_started(task_id: str, **kwargs: Any) -> None:
    _started[task_id] = time.perf_counter()


@task_postrun.connect
def _task_finished(task_id: str, task: Any, state: str | None = None, **kwargs: Any) -> None:
    started = _started.pop(task_id, None)
    name = getattr(task, "name", "unknown")
    TASKS.labels(name, state or "UNKNOWN").inc()
    if started is not None:
        TASK_SECONDS.labels(name).observe(time.perf_counter() - started)


@task_failure.connect
def _task_failed(sender: Any = None, exception: BaseException | None = None, **kwargs: Any) -> None:
    FAILURES.labels(getattr(sender, "name", "unknown"), type(exception).__name__).inc()


def readiness() -> list[CheckResult]:
    """/readyz of the worker: the database its tasks write and the Redis they come from."""
    return run_checks([database_check, redis_check])


@worker_init.connect
def _start_server(sender: Any = None, **kwargs: Any) -> None:
    global _server
    port = settings.ARGUS_CELERY_METRICS_PORT
    if not port:
        return
    directory = multiprocess_dir()
    if directory:
        # Values left by an earlier run's processes would be added to this one's; this process's
        # own files (its metrics were created at import) stay.
        own = f"_{os.getpid()}.db"
        for stale in Path(directory).glob("*.db"):
            if not stale.name.endswith(own):
                stale.unlink()
    else:
        pool = str(getattr(sender, "pool_cls", "prefork")).lower()
        if not any(name in pool for name in SINGLE_PROCESS_POOLS):
            log.warning(
                "PROMETHEUS_MULTIPROC_DIR is not set: with the prefork pool the tasks run in child processes, "
                "and /metrics on port %d will not count them (set it to an empty directory, see docs/operations.md)",
                port,
            )
    try:
        _server = ProbeServer(port, readiness).start()
    except OSError as exc:
        # The tasks matter more than their metrics: run them, and say loudly why there are none.
        log.error("worker metrics server not started on port %d: %s (ARGUS_CELERY_METRICS_PORT)", port, exc)


@worker_process_shutdown.connect
def _process_exited(pid: int | None = None, **kwargs: Any) -> None:
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid or os.getpid())


@worker_shutdown.connect
def _stop_server(**kwargs: Any) -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None
