"""The shape every long-running command shares: loop `step()` until a signal, then finish.

The signal handler only sets a flag; the loop finishes the batch in hand, closes cleanly and the
command exits 0. Work is done back to back while there is any; `step()` itself waits when idle.
A database error never ends the loop: the step is tried again after a backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

from argus.health import CheckResult
from argus.invalidation import Invalidatable, InvalidationListener
from argus.outage import database_outage, is_database_error
from argus.probes import ProbeServer

log = logging.getLogger(__name__)


async def run_until_stopped(
    name: str,
    *,
    start: Callable[[], Awaitable[None]],
    step: Callable[[], Awaitable[bool]],
    close: Callable[[], Awaitable[None]],
    metrics_port: int = 0,
    readiness: Callable[[], list[CheckResult]] | None = None,
) -> None:
    """Run a worker's steps until SIGTERM/SIGINT, then close it; /metrics, /healthz and /readyz
    (from `readiness`) on `metrics_port` meanwhile (argus/probes.py)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    probes = ProbeServer(metrics_port, readiness or list).start() if metrics_port else None
    await start()
    log.info("%s started metrics_port=%s", name, metrics_port or "off")
    steps = 0
    try:
        while not stopping.is_set():
            try:
                if await step():
                    steps += 1
            except Exception as exc:
                # The workers wait out database outages themselves; this is the net under them,
                # so that no database error they missed ends the process.
                if not is_database_error(exc):
                    raise
                delay = database_outage().failed(exc)
                log.warning("%s step failed on the database, trying again in %.1f s", name, delay, exc_info=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=delay)
    finally:
        await close()
        if probes is not None:
            probes.stop()
        log.info("%s stopped after %d busy steps", name, steps)


class Worker(Protocol):
    """A long-running process's work: connect, do one step (True if there was work), close."""

    async def start(self) -> None: ...

    async def step(self) -> bool: ...

    async def close(self) -> None: ...

    def readiness(self) -> list[CheckResult]:
        """Its /readyz checks (called from the probe server's thread: reads state, never waits long)."""
        ...


def run_worker(name: str, worker: Worker, *, cache: Invalidatable, metrics_port: int) -> None:
    """Run a worker until SIGTERM/SIGINT, its cache kept fresh by profile invalidations."""
    listener = InvalidationListener(cache)
    listener.start()
    freeze_startup_objects()
    try:
        asyncio.run(
            run_until_stopped(
                name,
                start=worker.start,
                step=worker.step,
                close=worker.close,
                metrics_port=metrics_port,
                readiness=worker.readiness,
            )
        )
    finally:
        listener.stop()


def freeze_startup_objects() -> None:
    """Keep what start-up allocated (Django, every module) out of the garbage collector's scans.

    Full collections otherwise walk those objects again and again while a worker decodes
    thousands of readings a second: freezing them cut the CPU of decoding a 2000-beacon
    transaction by about a third (issue 4).
    """
    gc.collect()
    gc.freeze()
