"""gunicorn's configuration for the web servers (docker/compose.yaml, the Dockerfile, `make demo`):
the server hooks prometheus-client's multiprocess mode needs (argus/metrics.py).

With PROMETHEUS_MULTIPROC_DIR set, every worker writes its metric values to files in that
directory and /metrics adds them up. The directory is emptied when the server starts (values of
an earlier run would otherwise be added to this one's), and an exited worker is marked dead.
Without the variable both hooks do nothing. The command lines keep their own flags (bind,
workers); gunicorn also reads this file by itself when started from the project's root.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def on_starting(server: Any) -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for stale in Path(directory).glob("*.db"):
            stale.unlink()


def child_exit(server: Any, worker: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
