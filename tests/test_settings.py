"""Settings that explain themselves: a malformed value stops the process with the variable, its
value and the expected form; system checks catch values that do not work together."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import run_checks

ROOT = Path(__file__).resolve().parent.parent


def load_settings(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import argus.settings"],
        env={**os.environ, "DEBUG": "1", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("ARGUS_INGEST_BATCH", "lots", "ARGUS_INGEST_BATCH='lots': expected a whole number (default 1000)"),
        ("ARGUS_LIVE_INTERVAL_SECONDS", "fast", "ARGUS_LIVE_INTERVAL_SECONDS='fast': expected a number"),
        ("ARGUS_HTTPS", "maybe", "ARGUS_HTTPS='maybe': expected a boolean"),
        ("ARGUS_HTTP_RATE_LIMIT", "600", "ARGUS_HTTP_RATE_LIMIT='600': expected <count>/<period>, e.g. 600/min"),
        ("ARGUS_HTTP_RATE_LIMIT", "10/fortnight", "expected <count>/<period>"),
        ("ARGUS_LOG_FORMAT", "xml", "ARGUS_LOG_FORMAT must be one of console, json"),
        ("ARGUS_STREAM_REPLICAS", "7", "ARGUS_STREAM_REPLICAS=7: expected 1 to 5 (1 or 3)"),
        ("ARGUS_STREAM_REPLICAS", "three", "ARGUS_STREAM_REPLICAS='three': expected a whole number"),
    ],
)
def test_it_names_the_variable_and_the_expected_form(name: str, value: str, expected: str) -> None:
    result = load_settings(**{name: value})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert expected in last, result.stderr[-2000:]


def test_it_reads_a_value_from_a_file(tmp_path: Path) -> None:
    value = tmp_path / "batch"
    value.write_text("250\n")
    result = subprocess.run(
        [sys.executable, "-c", "import argus.settings as s; print(s.ARGUS_INGEST_BATCH)"],
        env={**os.environ, "DEBUG": "1", "ARGUS_INGEST_BATCH_FILE": str(value)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "250", result.stderr[-2000:]
    missing = load_settings(SECRET_KEY_FILE=str(tmp_path / "nowhere"))
    assert "SECRET_KEY_FILE=" in missing.stderr and "cannot read it" in missing.stderr


def ids() -> set[str]:
    return {message.id for message in run_checks(tags=["argus"]) if message.id}


def test_it_checks_that_mqtts_has_the_bridges_certificate(settings: Any, tmp_path: Path) -> None:
    settings.MQTT_URL = "mqtts://broker:8883"
    settings.ARGUS_BRIDGE_CERT = str(tmp_path / "bridge.crt")
    settings.ARGUS_BRIDGE_KEY = str(tmp_path / "bridge.key")
    settings.ARGUS_BRIDGE_CA = str(tmp_path / "ca.crt")
    errors = [m for m in run_checks(tags=["argus"]) if m.id == "argus.E001"]
    assert len(errors) == 3 and all("pki issue-client argus-bridge" in (m.hint or "") for m in errors)
    for name in ("bridge.crt", "bridge.key", "ca.crt"):
        (tmp_path / name).write_text("x")
    assert "argus.E001" not in ids()
    settings.MQTT_URL = "mqtt://broker:1883"
    (tmp_path / "ca.crt").unlink()
    assert "argus.E001" not in ids()


def test_it_checks_limits_that_must_agree(settings: Any) -> None:
    assert ids() == set()
    settings.ARGUS_INGEST_BATCH = 50_000
    assert "argus.E002" in ids()
    settings.ARGUS_INGEST_BATCH = 1000
    settings.ARGUS_READY_CHECK_TIMEOUT_SECONDS = 0
    assert "argus.E003" in ids()
