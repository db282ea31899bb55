"""The fault suite's runner and checker (devtools/faults.py): the checker's arithmetic, and a
shortened `ingest-killed` on real processes and servers, so `make test` covers the runner."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django_tenants.utils import schema_context

from devtools.faults import FAULTS, FaultRun, Outcome, compare
from tests.conftest import TenantPersona, make_device, make_device_type
from tests.pipeline import pipeline_env


def test_it_counts_lost_and_duplicated_acknowledged_messages() -> None:
    outcome = compare("f", ["a", "b", "c"], {"a": 1, "b": 3, "x": 1})
    assert (outcome.acked, outcome.stored, outcome.lost, outcome.duplicates) == (3, 5, 1, 2)
    assert not outcome.passed
    assert compare("f", ["a"], {"a": 1}).passed


@contextmanager
def shortened(
    name: str, tenant: TenantPersona, log_dir: Path, *, rate: float, before: float, during: float, after: float
) -> Iterator[tuple[FaultRun, Outcome]]:
    """Run the named fault with shorter timings on a fresh device of the tenant; the run stays
    open (its processes and servers inspectable) until the block ends."""
    with schema_context(tenant.schema):
        device = make_device(make_device_type())
    run = FaultRun(
        dataclasses.replace(FAULTS[name], rate=rate, before=before, during=during, after=after),
        schema=tenant.schema,
        logical_id=device.logical_identifier,
        log_dir=log_dir,
        env=pipeline_env(mqtt_url="", nats_url="", client_id=""),  # the run sets its own servers
        log=lambda text: None,
    )
    try:
        yield run, run.run()
    finally:
        run.close()


@pytest.mark.integration
def test_it_runs_a_shortened_ingest_killed_fault(live_db: None, alpha: TenantPersona, tmp_path: Path) -> None:
    with shortened("ingest-killed", alpha, tmp_path, rate=100, before=2, during=3, after=2) as (_, outcome):
        pass
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


@pytest.mark.integration
def test_it_runs_a_shortened_nats_node_kill_on_a_three_node_cluster(
    live_db: None, alpha: TenantPersona, tmp_path: Path
) -> None:
    # Messages published over MQTT and stored in PostgreSQL through a three-node JetStream
    # cluster (streams R3), the stream leader's node SIGKILLed in between and started again.
    # The load goes on for 12 s after the kill: a Raft election can take up to ~10 s, and what
    # shows publishing resumed is a publish stored after it.
    with shortened("nats-node-kill", alpha, tmp_path, rate=100, before=2, during=4, after=8) as (run, outcome):
        assert run.cluster is not None
        assert len(run.cluster.url.split(",")) == 3
    result = outcome.as_dict()
    assert not outcome.problems, outcome.problems
    assert 0 < result["details"]["publishing_resumed_s"] <= 15
    assert result | {"seconds": 0, "details": {}} == {
        "fault": "nats-node-kill",
        "acked": 1400,
        "stored": 1400,
        "lost": 0,
        "duplicates": 0,
        "passed": True,
        "sent": 1400,
        "seconds": 0,
        "problems": [],
        "details": {},
    }


@pytest.mark.integration
def test_it_runs_a_shortened_bridge_kill_one_of_two_on_a_shared_subscription(
    live_db: None, alpha: TenantPersona, tmp_path: Path
) -> None:
    # Two bridges on one MQTT shared subscription (own client ids, persistent sessions), one
    # SIGKILLed and started again: the other stores meanwhile, the dead one's share comes after.
    with shortened("bridge-kill-one-of-two", alpha, tmp_path, rate=100, before=2, during=4, after=2) as (
        run,
        outcome,
    ):
        assert run.pipeline is not None
        bridges = [c for c in run.pipeline.children if c.name.startswith("runbridge")]
        assert len(bridges) == 2
        assert all(b.env is not None and b.env["ARGUS_BRIDGE_SHARE_GROUP"] for b in bridges)
        assert len({b.env["ARGUS_BRIDGE_CLIENT_ID"] for b in bridges if b.env is not None}) == 2
    assert not outcome.problems, outcome.problems
    details = outcome.details
    assert 0 < details["stored_while_one_was_out"] <= details["sent_while_one_was_out"]
    assert (outcome.sent, outcome.acked, outcome.stored, outcome.lost, outcome.duplicates) == (800, 800, 800, 0, 0)
