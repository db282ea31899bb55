"""The fault suite's runner and checker (devtools/faults.py): the checker's arithmetic, and a
shortened `ingest-killed` on real processes and servers, so `make test` covers the runner."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from django_tenants.utils import schema_context

from devtools.faults import FAULTS, FaultRun, compare
from tests.conftest import TenantPersona, make_device, make_device_type
from tests.pipeline import pipeline_env


def test_it_counts_lost_and_duplicated_acknowledged_messages() -> None:
    outcome = compare("f", ["a", "b", "c"], {"a": 1, "b": 3, "x": 1})
    assert (outcome.acked, outcome.stored, outcome.lost, outcome.duplicates) == (3, 5, 1, 2)
    assert not outcome.passed
    assert compare("f", ["a"], {"a": 1}).passed


@pytest.mark.integration
def test_it_runs_a_shortened_ingest_killed_fault(live_db: None, alpha: TenantPersona, tmp_path: Path) -> None:
    with schema_context(alpha.schema):
        device = make_device(make_device_type())
    fault = dataclasses.replace(FAULTS["ingest-killed"], rate=100, before=2, during=3, after=2)
    run = FaultRun(
        fault,
        schema=alpha.schema,
        logical_id=device.logical_identifier,
        log_dir=tmp_path,
        env=pipeline_env(mqtt_url="", nats_url="", client_id=""),  # the run sets its own servers
        log=lambda text: None,
    )
    try:
        outcome = run.run()
    finally:
        run.close()
    assert outcome.as_dict() | {"seconds": 0} == {
        "fault": "ingest-killed",
        "acked": 700,
        "stored": 700,
        "lost": 0,
        "duplicates": 0,
        "passed": True,
        "sent": 700,
        "seconds": 0,
        "problems": [],
    }
