"""Helpers for tests that run the real pipeline: private broker and NATS, runbridge/runingest
as subprocesses against the test database, publishers and polling."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import nats
import orjson
import paho.mqtt.client as mqtt
from django.conf import settings
from paho.mqtt.enums import CallbackAPIVersion

from devtools.faults import database_url
from devtools.services import ServerHandle
from devtools.supervisor import BEAT_READY, BRIDGE_READY, INGEST_READY, WORKER_READY, Child, celery, manage
from telemetry.jetstream import DEADLETTER_STREAM

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def read_deadletters(nats_url: str) -> list[tuple[str, dict[str, str], bytes]]:
    async def read() -> list[tuple[str, dict[str, str], bytes]]:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            sub = await js.pull_subscribe("deadletter.>", stream=DEADLETTER_STREAM)
            found = []
            try:
                while True:
                    for msg in await sub.fetch(100, timeout=0.5):
                        found.append((msg.subject, dict(msg.headers or {}), msg.data))
                        await msg.ack()
            except TimeoutError:
                # nats-py raises its own TimeoutError or, when the deadline runs out between its
                # two pull requests (a loaded machine), asyncio's; both mean "nothing more".
                return found
        finally:
            await nc.close()

    return asyncio.run(read())


class ManagedProcess(Child):
    """A `manage.py` command run as a child process, each start logging to a new file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        super().__init__(name=name, argv=manage(*args), log_path=log_dir / f"{name}.log", env=env)
        self.log_dir = log_dir

    def start(self) -> ManagedProcess:
        self.log_path = self.log_dir / f"{self.name}-{uuid.uuid4().hex[:6]}.log"
        super().start()
        return self

    def stop(self, timeout: float = 40) -> int:
        """SIGTERM, wait; returns the exit code (fails the test if it had to be killed)."""
        code = super().stop(timeout)
        if code is None:
            raise AssertionError(f"{self.name} did not stop on SIGTERM; log: {self.log()}")
        return code

    def log(self) -> str:
        return self.log_text()[-5000:]


def pipeline_env(*, mqtt_url: str, nats_url: str, client_id: str) -> dict[str, str]:
    """Environment of pipeline processes pointed at the test database and private servers."""
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "argus.settings_test",
            "ARGUS_TESTING": "1",
            "DATABASE_URL": database_url(),
            "MQTT_URL": mqtt_url,
            "NATS_URL": nats_url,
            "ARGUS_BRIDGE_CLIENT_ID": client_id,
            "ARGUS_BRIDGE_METRICS_PORT": "0",
            "ARGUS_INGEST_METRICS_PORT": "0",
            "ARGUS_CELERY_METRICS_PORT": "0",
            "ARGUS_MAX_PAYLOAD_BYTES": str(settings.ARGUS_MAX_PAYLOAD_BYTES),
            # Most pipeline tests push thousands of messages through one device as fast as they
            # can (load, not policy); tests of the per-device limit set their own.
            "ARGUS_BRIDGE_DEVICE_RATE": "0",
        }
    )
    return env


def wait_for(
    check: Callable[[], T | Literal[False] | None],
    *,
    timeout: float = 20,
    interval: float = 0.1,
    what: str | Callable[[], str] = "condition",
) -> T:
    """Poll until `check()` returns something truthy; fail after the timeout."""
    deadline = time.monotonic() + timeout
    last = check()
    while not last:
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {described} (last: {last!r})")
        time.sleep(interval)
        last = check()
    return last


class Publisher:
    """A device-side MQTT client (paho, QoS 1) that waits until the broker has each message."""

    def __init__(self, mqtt_url: str, client_id: str | None = None) -> None:
        host, port = mqtt_url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"dev-{uuid.uuid4().hex[:8]}")
        self.client.max_inflight_messages_set(1000)
        self.client.connect(host, int(port))
        self.client.loop_start()

    def send(self, logical_id: str, payload: Any, *, wait: bool = True) -> mqtt.MQTTMessageInfo:
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        info = self.client.publish(f"devices/{logical_id}/telemetry", body, qos=1)
        if wait:
            info.wait_for_publish(10)
        return info

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def publisher(mqtt_url: str) -> Iterator[Publisher]:
    p = Publisher(mqtt_url)
    try:
        yield p
    finally:
        p.close()


class Pipeline:
    """runbridge + runingest against the private servers."""

    def __init__(
        self,
        broker: ServerHandle,
        nats_server: ServerHandle,
        log_dir: Path,
        extra_env: dict[str, str] | None = None,
        *,
        mqtt_url: str | None = None,
    ) -> None:
        # mqtt_url: another listener of the broker, e.g. its mTLS one (mqtts://, with the
        # bridge's ARGUS_BRIDGE_CERT/KEY/CA in extra_env).
        self.mqtt_url = mqtt_url or f"mqtt://127.0.0.1:{broker.port}"
        self.nats_url = nats_server.url
        env = pipeline_env(mqtt_url=self.mqtt_url, nats_url=self.nats_url, client_id=f"bridge-{uuid.uuid4().hex[:8]}")
        env.update(extra_env or {})
        self.env = env
        self.bridge = ManagedProcess("runbridge", ["runbridge"], env, log_dir)
        self.ingest = ManagedProcess("runingest", ["runingest"], env, log_dir)

    def start(self) -> Pipeline:
        self.ingest.start()
        self.start_bridge()
        wait_for(
            lambda: INGEST_READY in self.ingest.log(),
            timeout=60,
            what=lambda: f"runingest to start: {self.ingest.log()}",
        )
        return self

    def start_bridge(self) -> None:
        self.bridge.start()
        wait_for(
            lambda: BRIDGE_READY in self.bridge.log(),
            timeout=60,
            what=lambda: f"runbridge to subscribe: {self.bridge.log()}",
        )

    def stop(self) -> None:
        codes = {}
        for process in (self.bridge, self.ingest):
            if process.running():
                codes[process.name] = process.stop()
        assert all(code == 0 for code in codes.values()), (codes, self.bridge.log(), self.ingest.log())


class CeleryProcess(ManagedProcess):
    """`celery -A argus <args>` as a child process; `kill()` takes the prefork pool's children
    down with the main process (its whole session), as a machine or container loss would."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        super().__init__(name, args, env, log_dir)
        self.argv = celery(*args)

    def full_log(self) -> str:
        return self.log_text()


class Celery:
    """A Celery worker and beat (schedule file in the log directory) with the pipeline env."""

    def __init__(self, env: dict[str, str], log_dir: Path, *, concurrency: int = 2) -> None:
        self.env = env
        self.worker = CeleryProcess(
            "celery-worker",
            ["worker", "--loglevel=INFO", f"--concurrency={concurrency}", "--without-gossip", "--without-mingle"],
            env,
            log_dir,
        )
        self.beat = CeleryProcess(
            "celery-beat", ["beat", "--loglevel=INFO", f"--schedule={log_dir / 'celerybeat-schedule'}"], env, log_dir
        )

    def start(self) -> Celery:
        self.start_worker()
        self.beat.start()
        wait_for(
            lambda: BEAT_READY in self.beat.full_log(),
            timeout=90,
            what=lambda: f"beat to start: {self.beat.log()}",
        )
        return self

    def start_worker(self) -> None:
        self.worker.start()
        wait_for(
            lambda: WORKER_READY in self.worker.full_log(),
            timeout=90,
            what=lambda: f"the worker to start: {self.worker.log()}",
        )

    def stop(self) -> None:
        codes = {}
        for process in (self.beat, self.worker):
            if process.running():
                codes[process.name] = process.stop()
        assert all(code == 0 for code in codes.values()), (codes, self.worker.log(), self.beat.log())
