"""The fleet simulator (devtools/fleet.py) and the fleet bench's verdict (devtools/fleet_bench.py).

The integration test is the bench in small: 50 devices, each with its own certificate from the
project's CA and its own connection to the shipped mutual-TLS listener (CRL and ACL on), publish
at QoS 1 through the real pipeline while the broker is restarted on its persistence; every
message the broker acknowledged must be stored exactly once.
"""

from __future__ import annotations

import io
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django_tenants.utils import schema_context

from devices.services import certificate_crl_publish
from devtools.faults import compare
from devtools.fleet import (
    FleetConfig,
    FleetResult,
    backoff_delay,
    connect_packet,
    parse_packets,
    publish_packet,
    run_fleet,
)
from devtools.fleet_bench import (
    PROBE_DEVICE,
    REVOKED_DEVICE,
    broker_tls_config,
    device_identities,
    failures,
    handshake_rates,
    prepare_pki,
    probe_identities,
    provision_fleet,
    run_probes,
    stored_msg_counts,
)
from devtools.services import ServerHandle, free_port, start_mosquitto
from devtools.simulator import ENDPOINT_METRICS, device_ids
from tests.conftest import TenantPersona, make_device_type, unique_id
from tests.pipeline import Pipeline, wait_for


def test_backoff_is_full_jitter_capped_and_growing() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # spread over the whole range, not a fixed step
    assert max(backoff_delay(40, 0.5, 30.0, rng) for _ in range(100)) <= 30.0


def test_packets_round_trip_through_the_parser() -> None:
    buffer = bytearray(publish_packet(b"devices/x/telemetry", 7, b"{}" * 100, dup=True) + b"\x40\x02\x00\x07")
    buffer += b"\x20\x02\x00"  # an incomplete CONNACK stays in the buffer
    packets = list(parse_packets(buffer))
    assert [p[0] for p in packets] == [0x3A, 0x40]
    assert packets[1][1] == b"\x00\x07"
    assert bytes(buffer) == b"\x20\x02\x00"
    connect = connect_packet("DEV-1", 60, clean_session=False)
    assert connect[0] == 0x10 and connect[9] == 0x00 and connect.endswith(b"DEV-1")


def clean_report(**overrides: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "devices": 10,
        "connected_devices": 10,
        "acked": 100,
        "stored": 100,
        "lost": 0,
        "duplicates": 0,
        "rejected": 0,
        "unacknowledged": 0,
        "drain_complete": True,
        "storm": True,
        "storm_all_back_s": 4.2,
        "exit_codes": {"runbridge": 0, "runingest#0": 0},
    }
    report.update(overrides)
    return report


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"lost": 2}, "lost=2"),
        ({"duplicates": 1}, "duplicates=1"),
        ({"rejected": 3}, "rejected=3"),
        ({"unacknowledged": 5}, "unacknowledged=5"),
        ({"acked": 0}, "acked=0"),
        ({"connected_devices": 9}, "connected 9 of 10 devices"),
        ({"storm_all_back_s": None}, "not every device came back after the broker restart"),
        ({"drain_complete": False, "stored": 90}, "drain_complete=False (90 of 100 stored)"),
        ({"exit_codes": {"runbridge": 1}}, "runbridge exited with 1"),
        ({"crl_revoked_refused": False}, "the broker accepted a revoked certificate"),
        ({"acl_forged_stored": 1, "acl_probe_connected": True, "acl_marker_stored": 1}, "acl_forged_stored=1"),
        ({"acl_probe_connected": True, "acl_marker_stored": 0}, "the ACL probe's own message was not stored"),
        ({"acl_probe_connected": False}, "the ACL probe's own message was not stored"),
    ],
)
def test_the_verdict_fails_a_run_that_lost_or_did_not_reconnect(overrides: dict[str, Any], expected: str) -> None:
    assert failures(clean_report()) == []
    assert any(expected in problem for problem in failures(clean_report(**overrides)))


def test_handshake_rates_are_mean_and_best_second() -> None:
    assert handshake_rates([100.1, 100.2, 100.3, 101.5, 103.0], 100.0) == (5 / 3.0, 3.0)
    assert handshake_rates([], 5.0) == (0.0, 0.0)


@pytest.mark.integration
def test_a_mtls_fleet_loses_nothing_through_a_broker_restart(
    live_db: None, alpha: TenantPersona, nats_server: ServerHandle, pki_dir: Path, tmp_path: Path
) -> None:
    prefix = unique_id("FLT")
    ids = [f"{prefix}-{i:03d}" for i in range(50)]
    with schema_context(alpha.schema):
        device_type = make_device_type(metrics=list(ENDPOINT_METRICS))
        provision_fleet([*ids, PROBE_DEVICE, REVOKED_DEVICE], device_type.name, print)
        prepare_pki(pki_dir)
        tls = device_identities(ids, pki_dir, print)
        probes = probe_identities(pki_dir)
        certificate_crl_publish(out_dir=pki_dir)
    tls_port = free_port()
    conf = broker_tls_config(pki_dir, tmp_path / "broker-tls", tls_port)
    assert "crlfile" in conf and "acl_file" in conf and "require_certificate true" in conf
    with start_mosquitto(conf_extra=conf, workdir=tmp_path / "broker") as broker:
        pipeline = Pipeline(broker, nats_server, tmp_path).start()
        try:
            config = FleetConfig(
                devices=ids,
                mqtt_url=f"mqtts://127.0.0.1:{tls_port}",
                tls=tls,
                interval=1.0,
                processes=2,
                msg_id_prefix=f"{prefix}-m",
                backoff_base=0.2,
                backoff_cap=2.0,
            )
            stop, holder = threading.Event(), dict[str, FleetResult]()
            statuses: list[Any] = []
            runner = threading.Thread(
                target=lambda: holder.update(
                    r=run_fleet(config, tmp_path / "fleet", stop=stop, on_status=statuses.append)
                )
            )
            runner.start()
            try:
                wait_for(
                    lambda: statuses and statuses[-1].connected == len(ids), timeout=30, what="the fleet to connect"
                )
                time.sleep(3)
                restarted = time.time()
                broker.restart(graceful=True)
                # The restarted broker still refuses the revoked certificate and applies the ACL.
                probed = run_probes(tls_port, probes, ids[0], f"{prefix}-m-probe-")
                assert probed == {"crl_revoked_refused": True, "acl_probe_connected": True}
                wait_for(
                    lambda: statuses[-1].connected == len(ids) and statuses[-1].connects >= 2 * len(ids),
                    timeout=30,
                    what="the fleet to come back",
                )
                time.sleep(2)
            finally:
                stop.set()
                runner.join(90)
            result = holder["r"]
            acked = result.acked
            assert result.unacked == 0, result.summary_line()
            back = result.all_connected_after(restarted)
            assert back is not None and back < 30
            # Some messages were sent on the first connection, some on the second, at 1 a second each.
            assert len(acked) >= len(ids) * 4, result.summary_line()
            assert result.lost_connections >= len(ids)
            wait_for(
                lambda: len(stored_msg_counts(0, f"{prefix}-m", alpha.schema)) >= len(acked) + 1,
                timeout=30,
                what="every acknowledged message to be stored",
            )
            stored = stored_msg_counts(0, f"{prefix}-m", alpha.schema)
            # The probe's message to its own topic arrived; the one to another device's did not.
            assert {k for k in stored if "-probe-" in k} == {f"{prefix}-m-probe-marker"}
            fleet_rows = {k: v for k, v in stored.items() if "-probe-" not in k}
            outcome = compare("fleet", acked, fleet_rows)
            assert (outcome.lost, outcome.duplicates, outcome.stored) == (0, 0, len(acked))
        finally:
            pipeline.stop()


@pytest.mark.integration
def test_simulate_fleet_publishes_with_the_certificates_provision_issued(
    live_db: None, alpha: TenantPersona, pki_dir: Path, tmp_path: Path
) -> None:
    prefix = unique_id("FLS")
    with schema_context(alpha.schema):
        device_type = make_device_type(metrics=list(ENDPOINT_METRICS))
    source = tmp_path / "fleet.csv"
    source.write_text(
        "logical_identifier,device_type\n" + "".join(f"{i},{device_type.name}\n" for i in device_ids(f"{prefix}-", 3))
    )
    bundles = tmp_path / "bundles"
    call_command("provision", str(source), schema=alpha.schema, issue_certificates=str(bundles), stdout=io.StringIO())
    prepare_pki(pki_dir)
    tls_port = free_port()
    conf = broker_tls_config(pki_dir, tmp_path / "broker-tls", tls_port)
    with start_mosquitto(conf_extra=conf, workdir=tmp_path / "broker") as broker:
        out = io.StringIO()
        call_command(
            "simulate",
            "--fleet",
            "--transport=mqtts",
            f"--mqtt-url=mqtt://127.0.0.1:{tls_port}",
            f"--prefix={prefix}-",
            "--count=3",
            "--interval=0.5",
            "--seconds=3",
            f"--cert-dir={bundles}",
            stdout=out,
        )
        assert broker.running()
    summary = out.getvalue().splitlines()[-1]
    fields = dict(f.split("=", 1) for f in summary.split() if "=" in f)
    assert fields["devices"] == "3" and fields["connects"] == "3" and fields["unacknowledged"] == "0", summary
    assert int(fields["acked"]) >= 9, summary  # 3 devices, 3 s, one message every 0.5 s each
