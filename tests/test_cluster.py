"""A JetStream cluster on this machine: NATS_URL naming several servers, the streams declared
with ARGUS_STREAM_REPLICAS copies on three real nats-servers (devtools.services.start_nats_cluster).
The pipeline on the cluster, with a node killed, is in tests/test_faults.py."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import nats
import nats.errors
import pytest
from pytest_django.fixtures import SettingsWrapper

from devtools.services import service_specs, start_nats_cluster
from telemetry.jetstream import (
    DEADLETTER_STREAM,
    INGEST_CONSUMER,
    TELEMETRY_STREAM,
    SyncPublisher,
    ensure_streams,
    nats_servers,
    stream_settings,
)


def test_it_reads_a_cluster_from_a_comma_separated_nats_url() -> None:
    assert nats_servers("nats://a:4222, nats://b:4222,nats://c:4222,") == [
        "nats://a:4222",
        "nats://b:4222",
        "nats://c:4222",
    ]
    assert nats_servers("nats://127.0.0.1:4222") == ["nats://127.0.0.1:4222"]
    with pytest.raises(ValueError, match="names no server"):
        nats_servers(" , ")
    # The service helper checks (or starts) the first server of the list.
    nats_spec = next(
        s for s in service_specs({"NATS_URL": "nats://127.0.0.1:4301,nats://127.0.0.1:4302"}) if s.name == "nats"
    )
    assert (nats_spec.host, nats_spec.port) == ("127.0.0.1", 4301)


def test_it_declares_the_streams_with_three_replicas_on_a_three_node_cluster(tmp_path: Path) -> None:
    limits = dataclasses.replace(stream_settings(), replicas=3)

    async def declare(url: str) -> dict[str, tuple[int, int]]:
        nc = await nats.connect(nats_servers(url))
        try:
            js = nc.jetstream()
            await ensure_streams(js, limits)
            await ensure_streams(js, limits)  # idempotent, as every process runs it at start-up
            await js.publish("telemetry.t.1", b"{}")
            found = {}
            for stream in (TELEMETRY_STREAM, DEADLETTER_STREAM):
                info = await js.stream_info(stream)
                assert info.cluster is not None and info.cluster.leader
                found[stream] = (info.config.num_replicas or 0, 1 + len(info.cluster.replicas or []))
            consumer = await js.consumer_info(TELEMETRY_STREAM, INGEST_CONSUMER)
            assert consumer.cluster is not None
            found[INGEST_CONSUMER] = (consumer.config.num_replicas or 0, 1 + len(consumer.cluster.replicas or []))
            return found
        finally:
            await nc.close()

    with start_nats_cluster(3, tmp_path) as cluster:
        assert len(nats_servers(cluster.url)) == 3
        found = asyncio.run(declare(cluster.url))
    # (configured replicas, peers that hold a copy); the consumer sets none and inherits the stream's.
    assert found == {TELEMETRY_STREAM: (3, 3), DEADLETTER_STREAM: (3, 3), INGEST_CONSUMER: (0, 3)}


def test_the_http_publisher_goes_on_when_its_node_dies(tmp_path: Path, settings: SettingsWrapper) -> None:
    # What the web's ingest endpoint uses (telemetry.jetstream.SyncPublisher), on the cluster's
    # NATS_URL with streams R3: the node it is connected to is SIGKILLed, and publishing goes on
    # within seconds through another (each failed call is the endpoint's 503; the device sends again).
    settings.ARGUS_STREAM_REPLICAS = 3
    with start_nats_cluster(3, tmp_path) as cluster:
        publisher = SyncPublisher(cluster.url)
        try:
            first = publisher.publish("telemetry.t.1", b"{}", {"Nats-Msg-Id": "one"}, timeout=10)
            assert publisher._nc is not None and publisher._nc.connected_url is not None
            port = publisher._nc.connected_url.port
            victim = next(i for i, node in enumerate(cluster.nodes) if node.port == port)
            cluster.kill(victim)
            deadline = time.monotonic() + 20
            while True:
                try:
                    second = publisher.publish("telemetry.t.1", b"{}", {"Nats-Msg-Id": "two"}, timeout=3)
                    break
                except (nats.errors.Error, TimeoutError, OSError):
                    assert time.monotonic() < deadline, "no publish acknowledged within 20 s of the node's death"
            assert second > first
            replicas = asyncio.run(_replicas(nats_servers(cluster.url)[victim - 1]))
            assert replicas == 3
            assert publisher._nc is not None and publisher._nc.connected_url is not None
            assert publisher._nc.connected_url.port != port
        finally:
            publisher.close()


async def _replicas(url: str) -> int:
    nc = await nats.connect(url)
    try:
        return int((await nc.jetstream().stream_info(TELEMETRY_STREAM)).config.num_replicas or 0)
    finally:
        await nc.close()
