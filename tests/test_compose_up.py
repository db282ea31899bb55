"""`docker compose up` from this checkout gives a working system: run only where a Docker engine
answers (this project's CI machines have none: there tests/test_compose.py and
tests/test_compose_pki.py check the file, its mounts and its certificates without one).

Brings the stack up under a throwaway project name with `--wait` (every health check green,
every one-shot job done), asks the web's /readyz from inside its container, publishes one
message on the plain listener through the broker container and finds it stored, then removes
the project with its volumes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yaml"


def _engine() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, check=False)
    return docker if probe.returncode == 0 else None


DOCKER = _engine()
pytestmark = pytest.mark.skipif(DOCKER is None, reason="no Docker engine answers here (docker info)")


@pytest.fixture
def stack() -> Iterator[list[str]]:
    assert DOCKER is not None
    project = f"argus-test-{uuid.uuid4().hex[:8]}"
    base = [DOCKER, "compose", "-f", str(COMPOSE), "-p", project, "--profile", "demo"]
    env = {**os.environ, "SECRET_KEY": uuid.uuid4().hex * 2}
    try:
        up = subprocess.run(
            [*base, "up", "-d", "--build", "--wait"], env=env, capture_output=True, text=True, timeout=1200, check=False
        )
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield base
    finally:
        subprocess.run(
            [*base, "down", "-v", "--remove-orphans"], env=env, capture_output=True, timeout=300, check=False
        )


def _exec(base: list[str], service: str, *argv: str) -> str:
    result = subprocess.run(
        [*base, "exec", "-T", service, *argv], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_it_comes_up_ready_and_stores_a_message(stack: list[str]) -> None:
    ready = _exec(
        stack,
        "web",
        "python",
        "-c",
        "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/readyz').read().decode())",
    )
    assert json.loads(ready)["status"] == "ok", ready
    msg_id = f"compose-up-{uuid.uuid4().hex[:8]}"
    payload = json.dumps(
        {"msg_id": msg_id, "ts": int(time.time() * 1000), "values": {"temperature": 21.0, "humidity": 40.0}}
    )
    _exec(
        stack,
        "mosquitto",
        "mosquitto_pub",
        "-h",
        "localhost",
        "-q",
        "1",
        "-t",
        "devices/TS-001-2024/telemetry",
        "-m",
        payload,
    )
    query = (
        "from django_tenants.utils import schema_context; from telemetry.models import TelemetryRaw;\n"
        f"with schema_context('demo'): print(TelemetryRaw.objects.filter(msg_id='{msg_id}').count())"
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _exec(stack, "web", "python", "manage.py", "shell", "-c", query).strip() == "1":
            return
        time.sleep(2)
    pytest.fail(f"{msg_id} was not stored within 60 s")
