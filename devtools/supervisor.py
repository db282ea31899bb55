"""One child-process supervisor for the demo, the benchmarks and the test helpers.

The platform's processes (web, runbridge, runingest, Celery worker and beat) run as children,
each in its own session (a terminal's Ctrl-C reaches only the parent, which stops them in order)
with its output in its own log file. A child is ready when its log says so (the lines below are
the ones the processes print) or when a check passes; a child that exits early is an error
with the tail of its log.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# What each process logs once it is ready for work.
BRIDGE_READY = "mqtt subscribed"  # bridge/bridge.py, after the broker confirmed the subscription
INGEST_READY = "runingest started"  # argus/runner.py, after the consumer is attached
WORKER_READY = " ready."  # celery worker
BEAT_READY = "beat: Starting"  # celery beat


class ChildError(RuntimeError):
    """A child process did not start, did not get ready, or died."""


def manage(command: str, *args: str) -> list[str]:
    """The argv of `manage.py COMMAND ARGS` with this interpreter."""
    return [sys.executable, str(PROJECT_ROOT / "manage.py"), command, *args]


def live_server(port: int, *args: str) -> list[str]:
    """The argv of the ASGI server (the dashboard's event streams; the Procfile's `live`): gunicorn
    with uvicorn's worker class on 127.0.0.1:port, with this interpreter."""
    return [
        *(sys.executable, "-m", "gunicorn", "argus.asgi:application"),
        *("--worker-class", "uvicorn_worker.UvicornWorker", "--bind", f"127.0.0.1:{port}", *args),
    ]


def celery(*args: str) -> list[str]:
    """The argv of `celery -A argus ARGS` with this interpreter."""
    return [sys.executable, "-m", "celery", "-A", "argus", *args]


@dataclass(eq=False)
class Child:
    """One process, with its log file and how to tell it is ready."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    ready: Callable[[Child], bool] | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        """Start the process (its log file started afresh)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=PROJECT_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        return "\n".join(f"    {line}" for line in self.log_text().splitlines()[-lines:])

    def is_ready(self) -> bool:
        return self.ready is None or self.ready(self)

    def check_alive(self) -> None:
        """Raise ChildError if the process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise ChildError(
                f"{self.name} exited with code {self.process.returncode}; see {self.log_path}\n{self.tail()}"
            )

    def wait_ready(self, timeout: float) -> None:
        """Wait until the child says it is ready (ChildError if it dies or time runs out)."""
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise ChildError(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}\n{self.tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM and wait; its exit code, or None when it had to be killed."""
        self.terminate()
        return self.wait(timeout)

    def terminate(self) -> None:
        """Send SIGTERM (the platform's processes finish their work in hand and exit 0)."""
        if self.running():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        """Wait for the exit; kill after the timeout and return None."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL to the process and everything in its session (a Celery pool, gunicorn
        workers), as a machine or container loss would."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def log_says(marker: str) -> Callable[[Child], bool]:
    """Readiness: the child's log contains marker."""
    return lambda child: marker in child.log_text()


def http_ok(url: str) -> Callable[[Child], bool]:
    """Readiness: GET url answers 200."""
    parts = url.split("/", 3)
    host, _, port = parts[2].partition(":")
    path = "/" + (parts[3] if len(parts) > 3 else "")

    def check(child: Child) -> bool:
        conn = http.client.HTTPConnection(host, int(port or 80), timeout=2)
        try:
            conn.request("GET", path)
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    return check


class Supervisor:
    """Starts named children, waits until all are ready, notices one dying, stops them in order."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.children: list[Child] = []

    def add(self, name: str, argv: list[str], ready: Callable[[Child], bool] | None = None) -> Child:
        log_name = name.replace("#", "-")
        child = Child(name=name, argv=argv, log_path=self.log_dir / f"{log_name}.log", env=self.env, ready=ready)
        self.children.append(child)
        return child

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def start(self) -> None:
        for child in self.children:
            child.start()

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()

    def wait_ready(self, timeout: float, stopping: threading.Event | None = None) -> float:
        """Wait until every child says it is ready; return how long it took."""
        started = time.monotonic()
        waiting = list(self.children)
        while waiting:
            self.check_alive()
            waiting = [child for child in waiting if not child.is_ready()]
            if not waiting:
                break
            if time.monotonic() - started > timeout:
                raise ChildError(
                    f"not ready after {timeout:.0f} s: "
                    + "; ".join(f"{c.name} (see {c.log_path})\n{c.tail()}" for c in waiting)
                )
            if stopping is not None and stopping.wait(0.25):
                raise ChildError("interrupted while starting")
            if stopping is None:
                time.sleep(0.25)
        return time.monotonic() - started

    def stop(self, order: list[list[str]], timeout: float) -> dict[str, int | None]:
        """SIGTERM the children group by group (names in `order`, the rest last), wait for each
        group; return the exit codes (None: killed after the timeout)."""
        by_name = {child.name: child for child in self.children}
        groups = [[by_name[n] for n in group if n in by_name] for group in order]
        rest = [c for c in self.children if not any(c in g for g in groups)]
        codes: dict[str, int | None] = {}
        for group in [*groups, rest]:
            for child in group:
                child.terminate()
            for child in group:
                if child.process is not None:
                    codes[child.name] = child.wait(timeout)
        return codes
