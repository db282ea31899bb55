"""The device simulator against a real private Mosquitto (shipped config) and a tiny HTTP server."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devtools.services import ServerHandle, start_mosquitto
from devtools.simulator import LeanMqttPublisher, SimulatorConfig, chunk_count, device_ids, run_simulation

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def broker() -> Iterator[ServerHandle]:
    with start_mosquitto() as handle:
        yield handle


@dataclass
class Received:
    """Everything a subscriber to devices/+/telemetry got: (topic, decoded payload)."""

    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, count: int) -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            self.lock.wait_for(lambda: len(self.messages) >= count, TIMEOUT)
            time.sleep(0.2)  # anything beyond `count` (a duplicate) would arrive now
            return list(self.messages)


@pytest.fixture
def received(broker: ServerHandle) -> Iterator[Received]:
    result = Received()
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-sim-sub-{time.monotonic_ns()}")

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with result.lock:
            result.messages.append((msg.topic, json.loads(msg.payload)))
            result.lock.notify_all()

    client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.subscribe("devices/+/telemetry", qos=1)
    assert subscribed.wait(TIMEOUT)
    yield result
    client.disconnect()
    client.loop_stop()


def _config(broker: ServerHandle, **values: Any) -> SimulatorConfig:
    values.setdefault("devices", device_ids("SIMTEST-", 5))
    return SimulatorConfig(mqtt_url=broker.url, **values)


def test_it_publishes_endpoint_messages_with_unique_ids(broker: ServerHandle, received: Received) -> None:
    result = run_simulation(_config(broker, mode="endpoint", messages=300))

    assert (result.sent, result.acked, result.errors) == (300, 300, 0)
    messages = received.wait_for(300)
    assert len(messages) == 300
    assert {m["msg_id"] for _, m in messages} == set(result.msg_ids())
    last_ts: dict[str, int] = defaultdict(int)
    for topic, message in messages:
        device = topic.split("/")[1]
        assert topic == f"devices/{device}/telemetry" and device.startswith("SIMTEST-")
        assert set(message) == {"msg_id", "ts", "values"}
        assert set(message["values"]) == {"temperature", "humidity", "pressure", "battery"}
        assert isinstance(message["ts"], int) and abs(message["ts"] / 1000 - time.time()) < 60
        # Per device, timestamps never repeat (the history key is device, metric, time).
        assert message["ts"] > last_ts[device]
        last_ts[device] = message["ts"]
    assert "sent=300 acked=300 errors=0" in result.summary_line()


def test_it_publishes_gateway_messages_with_50_children(broker: ServerHandle, received: Received) -> None:
    result = run_simulation(_config(broker, mode="gateway", messages=20, devices=["GW-A", "GW-B"]))

    messages = received.wait_for(20)
    assert len(messages) == 20 and result.readings == 20 * 50 * 2
    for topic, message in messages:
        gateway = topic.split("/")[1]
        assert set(message) == {"msg_id", "ts", "children"}
        children = message["children"]
        assert len(children) == 50 and len({c["id"] for c in children}) == 50
        for child in children:
            assert child["id"].startswith(f"BEACON-{gateway}-")
            assert set(child["values"]) == {"rssi", "battery"}
            assert -130 <= child["values"]["rssi"] <= 0 and 0 <= child["values"]["battery"] <= 100


def test_it_splits_a_chunked_report_into_67_chunks_covering_every_beacon_once(
    broker: ServerHandle, received: Received
) -> None:
    # One message asked for: the transaction it starts is always sent whole.
    config = _config(
        broker,
        mode="gateway_chunked",
        devices=["BLE-GW-1"],
        beacons=2000,
        chunk_size=30,
        shuffle_chunks=True,
        messages=1,
        seed=7,
    )
    result = run_simulation(config)

    assert chunk_count(2000, 30) == 67
    assert result.sent == 67
    messages = [m for _, m in received.wait_for(67)]
    assert len(messages) == 67
    assert len({m["transaction_id"] for m in messages}) == 1
    assert {m["total"] for m in messages} == {67}
    assert sorted(m["chunk"] for m in messages) == list(range(67))
    assert len({m["ts"] for m in messages}) == 1
    assert len({m["msg_id"] for m in messages}) == 67
    # Shuffled: the order sent is not simply 0..66.
    assert [m["chunk"] for m in messages] != list(range(67))
    beacons = [c["id"] for m in messages for c in m["children"]]
    assert len(beacons) == 2000 and len(set(beacons)) == 2000
    assert all(len(m["children"]) == 30 for m in messages if m["chunk"] < 66)
    assert len(next(m for m in messages if m["chunk"] == 66)["children"]) == 2000 - 66 * 30


def test_it_paces_messages_at_the_rate_asked(broker: ServerHandle, received: Received) -> None:
    started = time.monotonic()
    result = run_simulation(_config(broker, messages=200, rate=100))
    elapsed = time.monotonic() - started

    assert result.sent == 200
    assert 1.5 <= elapsed < 10
    assert 60 <= result.achieved_rate <= 140
    assert len(received.wait_for(200)) == 200


def test_it_stops_after_the_seconds_asked(broker: ServerHandle, received: Received) -> None:
    result = run_simulation(_config(broker, seconds=1.0, rate=200))

    assert 120 <= result.sent <= 260
    assert len(received.wait_for(result.sent)) == result.sent


def test_it_spreads_load_over_worker_processes(broker: ServerHandle, received: Received) -> None:
    result = run_simulation(_config(broker, messages=1000, processes=2, devices=device_ids("SIMPROC-", 10)))

    assert len(result.workers) == 2
    assert (result.sent, result.acked, result.errors) == (1000, 1000, 0)
    messages = received.wait_for(1000)
    assert len(messages) == 1000
    assert {m["msg_id"] for _, m in messages} == set(result.msg_ids())
    # Each process owns its own devices, so per-device timestamps still never collide.
    by_worker: dict[str, set[str]] = defaultdict(set)
    for topic, message in messages:
        by_worker[message["msg_id"].rsplit("-", 2)[-2]].add(topic)
    assert len(by_worker) == 2 and not set.intersection(*by_worker.values())


def test_it_posts_to_the_http_api_with_each_devices_key() -> None:
    seen: list[tuple[str, str, dict[str, Any]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, self.headers["Authorization"], json.loads(body)))
            status = 429 if len(seen) == 1 else 202  # the first one is told to retry
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if status == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = SimulatorConfig(
            devices=["HTTP-1", "HTTP-2"],
            transport="http",
            http_url=f"http://127.0.0.1:{server.server_address[1]}/api/v1/telemetry",
            api_keys={"HTTP-1": "key-one", "HTTP-2": "key-two"},
            messages=10,
        )
        result = run_simulation(config)
    finally:
        server.shutdown()
        server.server_close()

    assert (result.sent, result.acked, result.errors) == (10, 10, 0)
    assert len(seen) == 11  # one retried after 429
    assert {path for path, _, _ in seen} == {"/api/v1/telemetry"}
    assert {auth for _, auth, _ in seen} == {"Api-Key key-one", "Api-Key key-two"}
    assert len({body["msg_id"] for _, _, body in seen}) == 10


def test_it_ends_a_lean_run_whose_connection_the_broker_took_over(broker: ServerHandle) -> None:
    config = SimulatorConfig(devices=["SIMLOST-1"], mqtt_url=broker.url, lean=True, client_id_prefix="sim-takeover")
    first = LeanMqttPublisher(config, config.devices, 0)
    first.window = 5
    # A second connection under the same client id makes the broker close the first one.
    second = LeanMqttPublisher(config, config.devices, 0)
    try:
        started = time.monotonic()
        outcomes = [first.publish("SIMLOST-1", b'{"values": {"t": 1}}') for _ in range(50)]
        first.flush(TIMEOUT)

        assert time.monotonic() - started < 10
        assert first.lost and outcomes[-1] is False
        assert any("closed" in sample or "failed" in sample for sample in first.error_samples)
    finally:
        first.close()
        second.close()
