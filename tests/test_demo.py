"""`manage.py demo` end to end, the way `make demo` runs it: under the service helper, against a
throwaway database, with a private MQTT broker and NATS started by the helper (the embedded
default), every process of the platform, and simulated devices of all three processing modes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from django.conf import settings
from psycopg import sql

from devtools.services import free_port
from tests.pipeline import ROOT

DEMO_SECONDS = 20
TIMEOUT = 240
SPARE_REDIS_DB = 13  # the tests use 15, a development instance 0


def _server_url(database: str) -> str:
    s: dict[str, Any] = settings.DATABASES["default"]
    auth = s["USER"] or "postgres"
    if s["PASSWORD"]:
        auth += f":{s['PASSWORD']}"
    return f"postgresql://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{database}"


def _drop_database(name: str) -> None:
    with psycopg.connect(_server_url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.mark.integration
def test_it_runs_the_whole_platform_and_reports_the_data(tmp_path: Path) -> None:
    database = f"argus_demo_test_{uuid.uuid4().hex[:8]}"
    redis_url = urlunsplit(urlsplit(settings.REDIS_URL)._replace(path=f"/{SPARE_REDIS_DB}"))
    env = {k: v for k, v in os.environ.items() if k not in ("ARGUS_TESTING", "DJANGO_SETTINGS_MODULE")}
    env.update(
        DJANGO_SETTINGS_MODULE="argus.settings",
        DEBUG="1",
        DEMO_SECONDS=str(DEMO_SECONDS),
        DATABASE_URL=_server_url(database),  # the helper creates it
        REDIS_URL=redis_url,
        # Nothing answers on these ports: the helper starts a private broker and NATS there.
        MQTT_URL=f"mqtt://127.0.0.1:{free_port()}",
        NATS_URL=f"nats://127.0.0.1:{free_port()}",
        ARGUS_WEB_PORT=str(free_port()),
        ARGUS_LIVE_PORT=str(free_port()),
        ARGUS_BRIDGE_METRICS_PORT=str(free_port()),
        ARGUS_INGEST_METRICS_PORT=str(free_port()),
        ARGUS_CELERY_METRICS_PORT=str(free_port()),
        ARGUS_BRIDGE_CLIENT_ID=f"argus-demo-test-{uuid.uuid4().hex[:6]}",
        ARGUS_RUN_DIR=str(tmp_path),
    )
    redis.Redis.from_url(redis_url).flushdb()  # no tasks left over from an earlier run
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "devtools.services", "run", "--", sys.executable, "manage.py", "demo"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        _drop_database(database)
        redis.Redis.from_url(redis_url).flushdb()
    took = time.monotonic() - started
    output = result.stdout + result.stderr
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in tmp_path.glob("demo/*.log"))
    assert result.returncode == 0, f"exit {result.returncode} after {took:.0f} s\n{output}\n{logs}"
    # The helper started the private servers and stopped them again.
    assert "mosquitto 127.0.0.1" in output and "(started" in output and "(stopped)" in output
    for line in (
        "[ok] endpoint readings stored",
        "[ok] HTTP readings accepted",
        "[ok] gateway children stored",
        "[ok] chunked transaction complete",
        "[ok] health scores updated",
        "DEMO OK",
        "Process exit codes: bridge 0, web 0, live 0, ingest 0, worker 0, beat 0",
    ):
        assert line in output, output
    assert "Chunked transactions: complete" in output, output
    assert re.search(r"TS-001-2024 +[1-9]\d* rows from 1 device", output), output
    assert re.search(r"BG-001-2024 +[1-9]\d* rows from 2000 device", output), output
    assert "/admin/" in output and "/api/docs/" in output and "/dashboard/" in output
