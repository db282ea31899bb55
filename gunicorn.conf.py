"""gunicorn's configuration for the web servers (docker/compose.yaml, the Dockerfile, `make demo`,
the Procfile): prometheus-client's multiprocess mode, so /metrics adds up every worker's values
instead of reporting whichever worker the scrape reached (argus/metrics.py).

Every worker writes its values to files in PROMETHEUS_MULTIPROC_DIR. Unset, this server gets a
temporary directory of its own (set here, in the master, before any worker starts or imports
prometheus-client), removed when it exits. The directory is emptied when the server starts
(values of an earlier run would otherwise be added to this one's) and an exited worker is marked
dead. The command lines keep their own flags (bind, workers); gunicorn also reads this file by
itself when started from the project's root.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

_own_directory = ""
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _own_directory = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="argus-web-metrics-")

# Imported here, after the variable is set, never inside a hook: child_exit runs from the master's
# SIGCHLD handler, which can interrupt an import in progress of the same module (two workers
# exiting at once made the second hook's import fail on a partially initialised module).
from prometheus_client import multiprocess  # noqa: E402


def on_starting(server: Any) -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for stale in Path(directory).glob("*.db"):
            stale.unlink()


def child_exit(server: Any, worker: Any) -> None:
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _own_directory:
        shutil.rmtree(_own_directory, ignore_errors=True)


# Threads per worker (gthread; ignored by the live server's uvicorn worker). An ingest request
# spends most of its time waiting on PostgreSQL, Redis and the JetStream PubAck: 2 workers x 8
# threads answered 177 requests/s where 4 sync workers answered 50 (make http-bench, BENCHMARKS.md).
threads = int(os.environ.get("ARGUS_WEB_THREADS", "8"))
