"""The benchmarks' verdicts and arithmetic, without running a benchmark: a run that lost, rejected
or did not drain anything must fail, and the figures they report are computed as documented."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from devtools import alert_bench, baseline, chunk_bench, history_bench, http_bench
from devtools.bench import (
    BenchError,
    BenchSettings,
    failures,
    human_summary,
)
from devtools.measure import ProcSampler, cost_report, sustained_rate


def chain(prefix: str = "", **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"sent": 1000, "acked_by_broker": 1000, "sim_errors": 0, "stored": 1000}
    values["drain_complete"] = True
    values.update(overrides)
    return {f"{prefix}{key}": value for key, value in values.items()}


def pipeline_report(**overrides: Any) -> dict[str, Any]:
    report = {
        "lost": 0,
        "duplicates": 0,
        "rejected": 0,
        "missing_readings": 0,
        "broker_dropped": 0,
        "exit_codes": {"runbridge": 0, "runingest#0": 0},
        **chain(),
    }
    report.update(overrides)
    return report


def test_it_passes_a_clean_run() -> None:
    assert failures(pipeline_report()) == []
    assert failures({**pipeline_report(), **chain("baseline_"), "baseline_exit_codes": {"baseline-bridge": 0}}) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"lost": 3}, "lost=3"),
        ({"duplicates": 1}, "duplicates=1"),
        ({"rejected": 90001}, "rejected=90001"),
        ({"missing_readings": 4}, "missing_readings=4"),
        ({"broker_dropped": 7}, "broker_dropped=7"),
        ({"drain_complete": False, "stored": 900}, "drain_complete=False (900 of 1000 stored)"),
        ({"sim_errors": 2}, "sim_errors=2"),
        ({"acked_by_broker": 990}, "unacknowledged=10"),
        ({"stored": 0}, "stored=0"),
        ({"exit_codes": {"runbridge": -9}}, "runbridge exited with -9"),
    ],
)
def test_it_fails_a_pipeline_run_that_lost_or_did_not_drain(overrides: dict[str, Any], expected: str) -> None:
    assert expected in failures(pipeline_report(**overrides))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"baseline_lost": 5}, "baseline_lost=5"),
        ({"baseline_duplicates": 1}, "baseline_duplicates=1"),
        ({"baseline_drain_complete": False}, "baseline_drain_complete=False (1000 of 1000 stored)"),
        ({"baseline_exit_codes": {"baseline-consumer": 1}}, "baseline-consumer exited with 1"),
    ],
)
def test_it_fails_a_run_whose_bare_chain_lost_or_did_not_drain(overrides: dict[str, Any], expected: str) -> None:
    report = {"baseline_lost": 0, "baseline_duplicates": 0, **chain("baseline_"), **overrides}
    assert expected in failures(report)  # BENCH_BASELINE=1: no pipeline keys at all


def test_it_fails_live_pages_that_missed_the_probe() -> None:
    report = pipeline_report(live_pages=2, live_probes=3, live_probe_missed=1, live_probe_deliveries=5)
    assert "live_probe_missed=1 of 6 deliveries" in failures(report)


def test_it_measures_a_chain_that_kept_up_over_the_load_window() -> None:
    rate = sustained_rate(
        stored=5000, expected=5000, first_send=100.0, last_send=110.0, first_stored=100.2, last_stored=110.5
    )
    assert rate.kept_up and rate.msgs_per_s == 500.0 and rate.drain_seconds == 0.5


def test_it_measures_a_chain_that_fell_behind_from_first_to_last_store() -> None:
    rate = sustained_rate(
        stored=5000, expected=5000, first_send=100.0, last_send=110.0, first_stored=101.0, last_stored=126.0
    )
    assert not rate.kept_up and rate.msgs_per_s == 200.0 and "fell behind" in rate.basis


def test_it_does_not_call_a_chain_that_lost_messages_kept_up() -> None:
    rate = sustained_rate(
        stored=4000, expected=5000, first_send=100.0, last_send=110.0, first_stored=100.0, last_stored=110.0
    )
    assert not rate.kept_up and rate.msgs_per_s == 400.0
    nothing = sustained_rate(stored=0, expected=5000, first_send=1, last_send=2, first_stored=0, last_stored=0)
    assert nothing.msgs_per_s == 0.0 and not nothing.kept_up


class FixedSampler(ProcSampler):
    """CPU seconds given, over a 10 s window."""

    def __init__(self, seconds: dict[str, float]) -> None:
        super().__init__({name: [] for name in seconds})
        self.seconds = seconds
        self.started_at, self.ended_at = 0.0, 10.0

    def cpu_seconds(self, name: str) -> float:
        return self.seconds[name]


def test_it_costs_the_chain_without_the_load_generator() -> None:
    sampler = FixedSampler(
        {"bridge": 1.0, "ingest": 1.5, "mosquitto": 0.5, "nats": 0.25, "postgres": 0.75, "load_generator": 3.0}
    )
    report = cost_report(sampler, 20_000, "", "pipeline_core_ms_per_1k_msgs")
    # (1.0 + 1.5 + 0.5 + 0.25 + 0.75) s = 4,000 core-ms for 20 x 1,000 messages.
    assert report["pipeline_core_ms_per_1k_msgs"] == 200.0
    assert report["core_ms_per_1k_load_generator"] == 150.0
    assert report["cpu_cores_bridge"] == 0.1
    assert cost_report(sampler, 0, "baseline_", "baseline_core_ms_per_1k_msgs")["baseline_core_ms_per_1k_msgs"] == 0


def test_it_reads_bench_baseline() -> None:
    both = BenchSettings.from_env({})
    assert both.runs_pipeline and both.runs_baseline
    only = BenchSettings.from_env({"BENCH_BASELINE": "1"})
    assert only.runs_baseline and not only.runs_pipeline
    skip = BenchSettings.from_env({"BENCH_BASELINE": "0"})
    assert skip.runs_pipeline and not skip.runs_baseline
    with pytest.raises(BenchError):
        BenchSettings.from_env({"BENCH_BASELINE": "maybe"})


def test_it_summarises_a_baseline_only_run() -> None:
    report = {
        "baseline_msgs_per_s": 100.0,
        "baseline_sustained_basis": "load window (kept up)",
        "baseline_offered_msgs_per_s": 100.0,
        "baseline_p50_latency_ms": 1.0,
        "baseline_p99_latency_ms": 2.0,
        "baseline_lost": 0,
        "baseline_duplicates": 0,
        "baseline_stored": 10,
        "baseline_sent": 10,
        "baseline_exit_codes": {},
        "baseline_core_ms_per_1k_bridge": 5.0,
        "baseline_core_ms_per_1k_msgs": 5.0,
    }
    text = human_summary(report)
    assert "Bare chain" in text and "bridge 5.0  => chain 5.0" in text


def test_it_packs_and_unpacks_a_baseline_envelope() -> None:
    messages = [(b"devices/A/telemetry", b'{"msg_id":"x1","ts":1}'), (b"devices/B/telemetry", b"")]
    assert baseline.decode(baseline.encode(messages)) == messages


def chunk_report(**overrides: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "transactions_sent": 10,
        "transactions": {"complete": 10},
        "readings": 20_000,
        "readings_expected": 20_000,
        "chunks_sent": 670,
        "chunks_acked_by_broker": 670,
        "sim_errors": 0,
        "endpoint_sent": 1000,
        "endpoint_acked_by_broker": 1000,
        "endpoint_sim_errors": 0,
        "endpoint_drain_complete": True,
        "endpoint_lost": 0,
        "endpoint_unexpected": 0,
        "endpoint_rejected": 0,
        "exit_codes": {"celery-worker": 0, "runbridge": 0},
    }
    report.update(overrides)
    return report


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"endpoint_lost": 90001}, "endpoint_lost=90001"),
        ({"endpoint_rejected": 12}, "endpoint_rejected=12"),
        ({"endpoint_drain_complete": False}, "endpoint_drain_complete=False"),
        ({"transactions": {"complete": 9, "pending": 1}}, "complete transactions 9 of 10"),
        ({"readings": 19_999}, "readings 19999 of 20000"),
        ({"chunks_acked_by_broker": 600}, "chunks_sent: 70 not acknowledged by the broker"),
        ({"exit_codes": {"celery-worker": None}}, "celery-worker exited with None"),
        ({"transactions_sent": 0, "transactions": {}, "readings_expected": 0, "readings": 0}, "transactions_sent=0"),
    ],
)
def test_it_fails_a_chunk_run_that_lost_anything(overrides: dict[str, Any], expected: str) -> None:
    assert chunk_bench.failures(chunk_report()) == []
    assert any(problem.startswith(expected) for problem in chunk_bench.failures(chunk_report(**overrides)))


def http_report(**overrides: Any) -> dict[str, Any]:
    report: dict[str, Any] = {"phases": ["single", "batch"], "exit_codes": {"web": 0, "runingest#0": 0}}
    for phase, readings in (("single", 2000), ("batch", 200_000)):
        report.update(
            {
                f"{phase}_acked": 1000,
                f"{phase}_statuses": {"202": 1000},
                f"{phase}_connection_errors": 0,
                f"{phase}_lost": 0,
                f"{phase}_not_accepted": 0,
                f"{phase}_stored_readings": readings,
                f"{phase}_acked_readings": readings,
                f"{phase}_drain_complete": True,
            }
        )
    report.update(overrides)
    return report


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"single_lost": 3}, "single: lost=3 of 1000 acknowledged"),
        ({"batch_not_accepted": 1}, "batch: not_accepted=1 of 1000 acknowledged"),
        ({"batch_stored_readings": 199_900}, "batch: readings stored 199900 of 200000 acknowledged"),
        ({"single_statuses": {"202": 990, "500": 10}}, "single: answers other than 202: {'500': 10}"),
        ({"single_statuses": {"202": 990, "429": 10}}, "single: answers other than 202: {'429': 10}"),
        ({"batch_connection_errors": 2}, "batch: connection_errors=2"),
        ({"single_drain_complete": False}, "single: drain_complete=False"),
        ({"single_acked": 0, "single_statuses": {"503": 5}}, "single: nothing acknowledged"),
        ({"exit_codes": {"web": 1}}, "web exited with 1"),
    ],
)
def test_it_fails_an_http_run_that_lost_or_refused_anything(overrides: dict[str, Any], expected: str) -> None:
    assert http_bench.failures(http_report()) == []
    assert expected in http_bench.failures(http_report(**overrides))


def test_it_sends_http_bodies_stored_once_each() -> None:
    # Every body is a distinct row (unique msg_id, or device times that never repeat), and a
    # batch is a list of BENCH_HTTP_BATCH readings with times increasing per device.
    bodies = http_bench.Bodies("run", batch=5)
    singles = [bodies.single("D1") for _ in range(50)]
    batches = [bodies.batched("D1") for _ in range(20)] + [bodies.batched("D2") for _ in range(5)]
    assert len(set(singles)) == 50 and len(set(batches)) == 25
    assert len({orjson.loads(b)["msg_id"] for b in singles}) == 50
    times = [item["ts"] for b in batches[:20] for item in orjson.loads(b)]
    assert len(times) == 100 and times == sorted(set(times))
    assert all(len(orjson.loads(b)) == 5 for b in batches)


def test_it_fails_an_alert_run_with_a_breach_left_without_its_alert() -> None:
    report = pipeline_report(alerts_missing=0, breaches_not_stored=0, alerts_unexpected=0, breaches_sent=4)
    assert alert_bench.alert_failures(report) == []
    assert alert_bench.alert_failures({**report, "alerts_missing": 1}) == ["alerts_missing=1"]
    assert alert_bench.alert_failures({**report, "breaches_not_stored": 2}) == ["breaches_not_stored=2"]
    assert alert_bench.alert_failures({**report, "lost": 1}) == ["lost=1"]


def test_it_fails_a_history_run_whose_table_or_selectors_came_up_short() -> None:
    report = {
        "rows": 100,
        "rows_expected": 100,
        "devices": 2,
        "metrics": 3,
        "results": {"history_buckets 24h/1min": {}},
        "returned": {"history_buckets 24h/1min": 1440, "latest_pairs": 6},
    }
    assert history_bench.failures(report) == []
    assert history_bench.failures({**report, "rows": 99}) == ["rows=99 of 100"]
    short = {**report, "returned": {"history_buckets 24h/1min": 0, "latest_pairs": 5}}
    assert history_bench.failures(short) == ["history_buckets 24h/1min returned nothing", "latest_pairs=5 of 6"]


def test_it_keeps_the_cpu_of_a_sampled_process_that_exited() -> None:
    import subprocess
    import sys
    import time

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(1.5)",
        ]
    )
    pids = [child.pid]
    sampler = ProcSampler({"child": lambda: pids})
    sampler.mark_start()
    child.wait()
    pids.clear()  # gone from the source, as a backend that Django closed
    time.sleep(0.6)
    sampler.mark_end()
    assert sampler.pids_seen("child") == 1
    assert 0.1 < sampler.cpu_seconds("child") < 1.0
