"""Device fleet simulator and load generator: endpoint, gateway and chunked-gateway devices over
MQTT, MQTT with mTLS, or HTTP (the shapes of docs/ingestion.md).

Plain functions and dataclasses, no Django: `manage.py simulate`, the benchmark and the demo
import them, and worker processes (spawned, so nothing is inherited) import this module alone.

Every message carries a unique `msg_id` (`<worker prefix><sequence>`, so a run's ids can be
rebuilt from the result without shipping them between processes) and `ts` = epoch ms at send,
kept strictly increasing per device: two messages of one device never share a timestamp, which
the history table's (device, metric, time) key would otherwise fold into one reading.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import math
import os
import pickle
import random
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent

MODES = ("endpoint", "gateway", "gateway_chunked")
TRANSPORTS = ("mqtt", "mqtts", "http")
TOPIC = "devices/{}/telemetry"
# Presence (docs/ingestion.md): "online" when connected, a last will for when the connection drops.
STATUS_TOPIC = "devices/{}/status"
ONLINE = b'{"state": "online"}'
WILL = b'{"state": "offline", "reason": "connection lost"}'
SHUTDOWN = b'{"state": "offline", "reason": "shutdown"}'
# paho cannot tell acknowledgements apart once more than 65535 QoS 1 publishes are outstanding
# (message ids wrap) and stalls well before that; a few thousand in flight saturate loopback.
DEFAULT_WINDOW = 2000
MAX_WINDOW = 30000
ENDPOINT_METRICS = ("temperature", "humidity", "pressure", "battery")
CHILD_METRICS = ("rssi", "battery")
CONNECT_TIMEOUT = 15.0
MAX_ERROR_SAMPLES = 5


class SimulatorError(RuntimeError):
    """The simulator could not be configured or could not connect."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TlsIdentity:
    """A device's client certificate, its key and the CA that signed the broker's certificate."""

    cert: str
    key: str
    ca: str


@dataclass
class SimulatorConfig:
    """What to simulate; `rate`/`messages` are totals over all processes (0 rate = flat out)."""

    devices: list[str]
    transport: str = "mqtt"
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mode: str = "endpoint"
    rate: float = 0.0
    seconds: float | None = None
    messages: int | None = None
    processes: int = 1
    qos: int = 1
    children: int = 50
    beacons: int = 2000
    chunk_size: int = 30
    shuffle_chunks: bool = False
    msg_id_prefix: str = ""
    window: int = DEFAULT_WINDOW
    ack_timeout: float = 30.0
    tls: dict[str, TlsIdentity] = field(default_factory=dict)
    http_url: str = ""
    http_ca: str = ""
    api_keys: dict[str, str] = field(default_factory=dict)
    client_id_prefix: str = ""
    seed: int | None = None
    # Plain MQTT only: a hand-rolled publisher far cheaper than paho (for benchmarks).
    lean: bool = False
    # Metrics per gateway child: 2 (rssi, battery) or 1 (rssi).
    child_metrics: int = len(CHILD_METRICS)
    # MQTT: one connection per device, each with a last will on devices/<id>/status and a
    # retained "online" once connected (and an "offline" before a clean disconnect).
    presence: bool = False
    # Worker processes (processes > 1) lower their CPU priority by this much (os.nice): a load
    # generator sending flat out on the machine it measures otherwise takes the CPU of the
    # processes under test, which devices sending from elsewhere never do.
    nice: int = 0

    def validate(self) -> None:
        """Raise SimulatorError for settings that cannot work."""
        if not self.devices:
            raise SimulatorError("no devices to simulate")
        if self.transport not in TRANSPORTS:
            raise SimulatorError(f"transport must be one of {', '.join(TRANSPORTS)}")
        if self.mode not in MODES:
            raise SimulatorError(f"mode must be one of {', '.join(MODES)}")
        if self.qos not in (0, 1):
            raise SimulatorError("qos must be 0 or 1")
        if self.rate < 0 or self.processes < 1 or self.children < 1 or self.beacons < 1 or self.chunk_size < 1:
            raise SimulatorError("rate must be >= 0; processes, children, beacons, chunk size >= 1")
        if not 1 <= self.window <= MAX_WINDOW:
            raise SimulatorError(f"window must be in 1..{MAX_WINDOW} (paho stalls beyond ~65k unacknowledged)")
        if self.presence and self.lean:
            raise SimulatorError("presence needs paho's MQTT connections, not --lean")
        if self.transport == "mqtts":
            missing = [d for d in self.devices if d not in self.tls]
            if missing:
                raise SimulatorError(f"mqtts: no certificate for {', '.join(missing[:5])}")
        if self.transport == "http":
            if not self.http_url:
                raise SimulatorError("http: --url is required")
            missing = [d for d in self.devices if d not in self.api_keys]
            if missing:
                raise SimulatorError(f"http: no API key for {', '.join(missing[:5])}")

    @property
    def readings_per_message(self) -> int:
        """Readings (metric values) one message carries."""
        if self.mode == "endpoint":
            return len(ENDPOINT_METRICS)
        if self.mode == "gateway":
            return self.children * self.child_metrics
        return self.chunk_size * self.child_metrics  # the last chunk of a transaction may be smaller


def device_ids(prefix: str, count: int) -> list[str]:
    """Logical ids `<prefix>0000` .. for a generated fleet."""
    width = max(4, len(str(count - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def chunk_count(beacons: int, chunk_size: int) -> int:
    """How many chunks one chunked-gateway report of `beacons` children takes."""
    return math.ceil(beacons / chunk_size)


def tls_from_directory(pki_dir: Path, devices: Sequence[str], ca: str | None = None) -> dict[str, TlsIdentity]:
    """Device certificates as `manage.py pki issue-device` writes them: devices/<id>/<serial>.crt/.key.

    The newest certificate of each device is used (a device may hold several during rotation).
    """
    ca_path = ca or str(pki_dir / "ca.crt")
    identities: dict[str, TlsIdentity] = {}
    for device in devices:
        certs = sorted(
            (p for p in (pki_dir / "devices" / device).glob("*.crt") if p.with_suffix(".key").is_file()),
            key=lambda p: p.stat().st_mtime,
        )
        if not certs:
            raise SimulatorError(f"no certificate with key for {device} under {pki_dir / 'devices' / device}")
        identities[device] = TlsIdentity(cert=str(certs[-1]), key=str(certs[-1].with_suffix(".key")), ca=ca_path)
    return identities


# --------------------------------------------------------------------------- payloads


class PayloadFactory:
    """Builds the JSON messages of one worker; msg ids are `<prefix><seq>` with seq from 0."""

    def __init__(self, config: SimulatorConfig, prefix: str, rng: random.Random) -> None:
        self.config = config
        self.prefix = prefix
        self.rng = rng
        self.seq = 0
        self.transactions = 0
        self._last_ts: dict[str, int] = {}
        self._children: dict[str, list[str]] = {}

    def next_msg_id(self) -> str:
        msg_id = f"{self.prefix}{self.seq}"
        self.seq += 1
        return msg_id

    def timestamp(self, device: str) -> int:
        """Epoch ms now, strictly increasing per device."""
        ts = max(int(time.time() * 1000), self._last_ts.get(device, 0) + 1)
        self._last_ts[device] = ts
        return ts

    def child_ids(self, device: str) -> list[str]:
        ids = self._children.get(device)
        if ids is None:
            count = self.config.beacons if self.config.mode == "gateway_chunked" else self.config.children
            width = max(4, len(str(count - 1)))
            ids = [f"BEACON-{device}-{i:0{width}d}" for i in range(count)]
            self._children[device] = ids
        return ids

    def _child_readings(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        uniform, randint = self.rng.uniform, self.rng.randint
        if self.config.child_metrics == 1:
            return [{"id": i, "values": {"rssi": round(uniform(-95, -40), 1)}} for i in ids]
        return [{"id": i, "values": {"rssi": round(uniform(-95, -40), 1), "battery": randint(20, 100)}} for i in ids]

    def single(self, device: str) -> bytes:
        """One endpoint or gateway message, stamped now."""
        if self.config.mode == "endpoint":
            uniform = self.rng.uniform
            document: dict[str, Any] = {
                "msg_id": self.next_msg_id(),
                "ts": self.timestamp(device),
                "values": {
                    "temperature": round(uniform(18.0, 26.0), 2),
                    "humidity": round(uniform(30.0, 60.0), 1),
                    "pressure": round(uniform(990.0, 1030.0), 1),
                    "battery": self.rng.randint(20, 100),
                },
            }
        else:
            document = {
                "msg_id": self.next_msg_id(),
                "ts": self.timestamp(device),
                "children": self._child_readings(self.child_ids(device)),
            }
        return orjson.dumps(document)

    def transaction(self, device: str) -> list[tuple[bytes, int]]:
        """(payload, readings) of each chunk of one chunked-gateway report, in sending order
        (shuffled if configured)."""
        ids = self.child_ids(device)
        size = self.config.chunk_size
        total = chunk_count(len(ids), size)
        transaction_id = f"{self.prefix}t{self.transactions}-{uuid.uuid4().hex[:8]}"
        self.transactions += 1
        ts = self.timestamp(device)
        order = list(range(total))
        if self.config.shuffle_chunks:
            self.rng.shuffle(order)
        chunks = []
        for index in order:
            children = ids[index * size : (index + 1) * size]
            document = {
                "msg_id": self.next_msg_id(),
                "transaction_id": transaction_id,
                "chunk": index,
                "total": total,
                "ts": ts,
                "children": self._child_readings(children),
            }
            chunks.append((orjson.dumps(document), len(children) * len(CHILD_METRICS)))
        return chunks


# --------------------------------------------------------------------------- pacing


class TokenBucket:
    """Paces sends at `rate` per second with at most 100 ms of burst (rate 0: unpaced)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate * 0.1)
        self.tokens = 1.0
        self.updated = time.monotonic()

    def wait_time(self) -> float:
        """Take a token and return 0, or return how long to wait before trying again."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


# --------------------------------------------------------------------------- transports


class Publisher(Protocol):
    sent: int
    acked: int
    errors: int
    error_samples: list[str]

    def publish(self, device: str, payload: bytes) -> bool:
        """Hand one message over; False if it could not even be queued."""

    def poll(self, timeout: float) -> None:
        """Process network traffic (acknowledgements) for up to timeout seconds."""

    def outstanding(self) -> int:
        """Messages sent but not yet acknowledged."""

    def flush(self, timeout: float) -> None:
        """Wait until everything sent is acknowledged or timeout passes."""

    def close(self) -> None: ...


def _note_error(publisher: Publisher, text: str) -> None:
    publisher.errors += 1
    if len(publisher.error_samples) < MAX_ERROR_SAMPLES:
        publisher.error_samples.append(text)


class _MqttConnection:
    """One paho client driven from the calling thread (no network thread: no lock traffic)."""

    def __init__(
        self, owner: MqttPublisher, client_id: str, tls: TlsIdentity | None, presence_device: str | None = None
    ) -> None:
        self.owner = owner
        self.presence_device = presence_device
        self._status_mids: set[int] = set()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
        )
        # Our own window bounds what is unacknowledged; paho must not queue behind it.
        self.client.max_inflight_messages_set(owner.window)
        self.client.max_queued_messages_set(0)
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
            context.load_cert_chain(tls.cert, tls.key)
            self.client.tls_set_context(context)
        self.connected = False
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.connect_failure = ""
        if presence_device is not None:
            # Retained, so whoever subscribes later (the bridge after a restart) learns the state.
            self.client.will_set(STATUS_TOPIC.format(presence_device), WILL, qos=1, retain=True)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.connect_failure = str(rc)
        else:
            self.connected = True
            if self.presence_device is not None:
                self._status(ONLINE)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connected = False

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        if mid in self._status_mids:  # not one of the messages the window counts
            self._status_mids.discard(mid)
            return
        self.owner.acked += 1

    def _status(self, payload: bytes) -> None:
        assert self.presence_device is not None
        info = self.client.publish(STATUS_TOPIC.format(self.presence_device), payload, qos=1, retain=True)
        self._status_mids.add(info.mid)

    def connect(self, host: str, port: int) -> None:
        try:
            self.client.connect(host, port, keepalive=60)
        except (OSError, ssl.SSLError) as exc:
            raise SimulatorError(f"cannot connect to MQTT broker {host}:{port}: {exc}") from exc
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while not self.connected:
            if self.connect_failure:
                raise SimulatorError(f"broker {host}:{port} refused the connection: {self.connect_failure}")
            if time.monotonic() > deadline:
                raise SimulatorError(f"no CONNACK from {host}:{port} within {CONNECT_TIMEOUT:.0f} s")
            self.client.loop(0.05)

    def poll(self, timeout: float) -> None:
        rc = self.client.loop(timeout)
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            # Lost connection: reconnect; paho re-sends every unacknowledged QoS 1 message (the
            # pipeline dedupes them by msg_id).
            # A reconnect is noted but is not an error: no message is lost by it.
            if len(self.owner.error_samples) < MAX_ERROR_SAMPLES:
                self.owner.error_samples.append(f"connection lost ({rc.name}); reconnecting")
            self.owner.reconnects += 1
            with contextlib.suppress(OSError, ssl.SSLError):
                self.client.reconnect()
            time.sleep(min(timeout, 0.5))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.presence_device is not None and self.connected:
                # A clean disconnect discards the will: say "offline" ourselves.
                self._status(SHUTDOWN)
                deadline = time.monotonic() + 2.0
                while self._status_mids and time.monotonic() < deadline:
                    self.client.loop(0.05)
            self.client.disconnect()
            self.client.loop(0.1)


class MqttPublisher:
    """Publishes over MQTT: one connection for the worker, or one per device with mTLS."""

    def __init__(self, config: SimulatorConfig, devices: Sequence[str], worker: int) -> None:
        parts = urlsplit(config.mqtt_url)
        secure = config.transport == "mqtts" or parts.scheme == "mqtts"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (8883 if secure else 1883)
        self.qos = config.qos
        self.window = config.window
        self.sent = 0
        self.acked = 0
        self.errors = 0
        self.reconnects = 0
        self.error_samples: list[str] = []
        base = config.client_id_prefix or f"argus-sim-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.connections: dict[str, _MqttConnection] = {}
        if secure:
            # With mTLS the certificate is the device's identity: one connection per device.
            for device in devices:
                presence = device if config.presence else None
                self.connections[device] = _MqttConnection(self, device, config.tls[device], presence)
            self._all = list(self.connections.values())
        elif config.presence:
            # A last will names one topic: one connection per device, so each has its own.
            for device in devices:
                self.connections[device] = _MqttConnection(self, f"{base}-{device}", None, device)
            self._all = list(self.connections.values())
        else:
            self._all = [_MqttConnection(self, f"{base}-w{worker}", None)]
        for connection in self._all:
            connection.connect(self.host, self.port)

    def _connection(self, device: str) -> _MqttConnection:
        return self.connections.get(device) or self._all[0]

    def outstanding(self) -> int:
        return self.sent - self.acked

    def publish(self, device: str, payload: bytes) -> bool:
        while self.outstanding() >= self.window:
            self.poll(0.005)
        info = self._connection(device).client.publish(TOPIC.format(device), payload, qos=self.qos)
        # NO_CONN with QoS 1: paho keeps the message and sends it after the reconnect.
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and self.qos > 0):
            self.sent += 1
            return True
        _note_error(self, f"publish failed: {info.rc.name}")
        return False

    def poll(self, timeout: float) -> None:
        if len(self._all) == 1:
            self._all[0].poll(timeout)
            return
        for connection in self._all:
            connection.poll(0)
        if timeout:
            time.sleep(timeout)

    def flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.outstanding() > 0 and time.monotonic() < deadline:
            self.poll(0.01)

    def close(self) -> None:
        for connection in self._all:
            connection.close()


class HttpPublisher:
    """POSTs each message to the ingestion API with the device's API key (keep-alive connection)."""

    RETRY_STATUSES = (429, 503)
    MAX_ATTEMPTS = 4

    def __init__(self, config: SimulatorConfig) -> None:
        parts = urlsplit(config.http_url)
        self.secure = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.secure else 80)
        self.path = parts.path or "/api/v1/telemetry"
        self.api_keys = config.api_keys
        self.ca = config.http_ca
        self.sent = 0
        self.acked = 0
        self.errors = 0
        self.retries = 0
        self.error_samples: list[str] = []
        self.conn = self._connect()

    def _connect(self) -> http.client.HTTPConnection:
        if self.secure:
            context = ssl.create_default_context(cafile=self.ca or None)
            return http.client.HTTPSConnection(self.host, self.port, timeout=30, context=context)
        return http.client.HTTPConnection(self.host, self.port, timeout=30)

    def outstanding(self) -> int:
        return 0

    def publish(self, device: str, payload: bytes) -> bool:
        headers = {"Content-Type": "application/json", "Authorization": f"Api-Key {self.api_keys[device]}"}
        self.sent += 1
        for attempt in range(self.MAX_ATTEMPTS):
            try:
                self.conn.request("POST", self.path, body=payload, headers=headers)
                response = self.conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.conn.close()
                self.conn = self._connect()
                if attempt + 1 == self.MAX_ATTEMPTS:
                    _note_error(self, f"HTTP request failed: {exc!r}")
                    return True
                self.retries += 1
                continue
            if response.status == 202:
                self.acked += 1
                return True
            if response.status in self.RETRY_STATUSES and attempt + 1 < self.MAX_ATTEMPTS:
                self.retries += 1
                try:
                    delay = float(response.getheader("Retry-After") or 1)
                except ValueError:
                    delay = 1.0
                time.sleep(min(max(delay, 0.05), 5.0))
                continue
            _note_error(self, f"HTTP {response.status}: {body[:200].decode(errors='replace')}")
            return True
        return True

    def poll(self, timeout: float) -> None:
        if timeout:
            time.sleep(timeout)

    def flush(self, timeout: float) -> None:
        return None

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- workers


@dataclass
class WorkerResult:
    """What one worker did; its msg ids are `<prefix><seq>` for seq in range(attempted) minus failed."""

    worker: int
    prefix: str
    attempted: int = 0
    failed_seqs: list[int] = field(default_factory=list)
    sent: int = 0
    acked: int = 0
    errors: int = 0
    readings: int = 0
    first_send: float = 0.0  # wall clock (time.time), comparable across processes
    last_send: float = 0.0
    reconnects: int = 0
    error_samples: list[str] = field(default_factory=list)

    def msg_ids(self) -> Iterator[str]:
        failed = set(self.failed_seqs)
        return (f"{self.prefix}{seq}" for seq in range(self.attempted) if seq not in failed)


@dataclass
class SimulatorResult:
    """The whole run, summed over workers."""

    config: SimulatorConfig
    workers: list[WorkerResult]

    @property
    def sent(self) -> int:
        return sum(w.sent for w in self.workers)

    @property
    def acked(self) -> int:
        return sum(w.acked for w in self.workers)

    @property
    def errors(self) -> int:
        return sum(w.errors for w in self.workers)

    @property
    def readings(self) -> int:
        return sum(w.readings for w in self.workers)

    @property
    def first_send(self) -> float:
        return min((w.first_send for w in self.workers if w.first_send), default=0.0)

    @property
    def last_send(self) -> float:
        return max((w.last_send for w in self.workers), default=0.0)

    @property
    def duration(self) -> float:
        """Seconds from the first to the last send (0 for fewer than two messages)."""
        return max(0.0, self.last_send - self.first_send)

    @property
    def achieved_rate(self) -> float:
        # n messages span n-1 intervals; with one message there is no rate to speak of.
        return (self.sent - 1) / self.duration if self.duration > 0 and self.sent > 1 else 0.0

    def msg_ids(self) -> Iterator[str]:
        for worker in self.workers:
            yield from worker.msg_ids()

    def summary_line(self) -> str:
        samples = [s for w in self.workers for s in w.error_samples][:MAX_ERROR_SAMPLES]
        line = (
            f"simulate: sent={self.sent} acked={self.acked} errors={self.errors} "
            f"duration={self.duration:.2f}s rate={self.achieved_rate:.1f} msg/s readings={self.readings} "
            f"mode={self.config.mode} transport={self.config.transport} qos={self.config.qos} "
            f"devices={len(self.config.devices)} processes={len(self.workers)}"
        )
        if samples:
            line += " first errors: " + " | ".join(samples)
        return line


class LeanMqttPublisher:
    """A minimal MQTT 3.1.1 publisher (QoS 0/1, plain TCP) for load generation.

    It builds PUBLISH packets by hand and writes them in batches, reading PUBACKs in bulk. paho
    costs about 75 us of CPU per message, which on a 2-core machine makes the load generator
    the largest consumer of CPU in a benchmark; this costs a fraction of that. It is still a
    real MQTT client of the real broker. No reconnects: a lost connection ends the run as errors.
    """

    def __init__(self, config: SimulatorConfig, devices: Sequence[str], worker: int) -> None:
        parts = urlsplit(config.mqtt_url)
        self.qos = config.qos
        self.window = min(config.window, 60000)
        self.sent = 0
        self.acked = 0
        self.errors = 0
        self.error_samples: list[str] = []
        client_id = f"{config.client_id_prefix or f'argus-sim-{os.getpid()}'}-lean{worker}".encode()
        try:
            self.sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 1883), timeout=10)
        except OSError as exc:
            raise SimulatorError(f"cannot connect to MQTT broker {config.mqtt_url}: {exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # CONNECT: protocol "MQTT" level 4, clean session, keepalive 60 s.
        body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(client_id)) + client_id
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        connack = self.sock.recv(4)
        if len(connack) != 4 or connack[0] != 0x20 or connack[3] != 0:
            raise SimulatorError(f"broker refused the connection: {connack!r}")
        self.sock.setblocking(False)
        self._out = bytearray()
        self._in = bytearray()
        self._next_id = 0
        self._last_flush = time.monotonic()
        self.lost = False  # the connection is gone: nothing more is sent or acknowledged

    def outstanding(self) -> int:
        return self.sent - self.acked

    def publish(self, device: str, payload: bytes) -> bool:
        while self.qos and self.outstanding() >= self.window and not self.lost:
            self.poll(0.005)
        if self.lost:
            return False
        topic = TOPIC.format(device).encode()
        if self.qos:
            self._next_id = self._next_id % 65535 + 1
            variable = struct.pack("!H", len(topic)) + topic + struct.pack("!H", self._next_id)
            header = 0x32
        else:
            variable = struct.pack("!H", len(topic)) + topic
            header = 0x30
        self._out += bytes((header,)) + _varint(len(variable) + len(payload)) + variable + payload
        self.sent += 1
        if not self.qos:
            self.acked += 1
        if len(self._out) >= 32768 or time.monotonic() - self._last_flush > 0.002:
            self._flush()
        return True

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        while self._out:
            try:
                written = self.sock.send(self._out)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lose(f"send failed: {exc}")
                return
            del self._out[:written]

    def poll(self, timeout: float) -> None:
        if self.lost:
            time.sleep(timeout)  # callers pacing a rate still wait, without a socket to wait on
            return
        self._flush()
        readable, writable, _ = select.select([self.sock], [self.sock] if self._out else [], [], timeout)
        if writable:
            self._flush()
        if not readable:
            return
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lose(f"receive failed: {exc}")
            return
        if not data:
            self._lose("broker closed the connection")
            return
        self._in += data
        # Only PUBACKs (0x40 0x02 id id) come back to a publisher.
        complete = len(self._in) // 4
        self.acked += complete
        del self._in[: complete * 4]

    def _lose(self, reason: str) -> None:
        # Without this, a publisher waiting for PUBACKs of a closed connection would spin forever.
        _note_error(self, reason)
        self.lost = True
        self._out.clear()

    def flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (self._out or self.outstanding()) and not self.lost and time.monotonic() < deadline:
            self.poll(0.01)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.setblocking(True)
            self.sock.sendall(bytes(self._out) + b"\xe0\x00")
            self.sock.close()


def _varint(value: int) -> bytes:
    """MQTT's variable-length integer."""
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _publisher(config: SimulatorConfig, devices: Sequence[str], worker: int) -> Publisher:
    if config.transport == "http":
        return HttpPublisher(config)
    if config.lean and config.transport == "mqtt" and not urlsplit(config.mqtt_url).scheme == "mqtts":
        return LeanMqttPublisher(config, devices, worker)
    return MqttPublisher(config, devices, worker)


def run_worker(
    config: SimulatorConfig,
    worker: int,
    devices: Sequence[str],
    *,
    rate: float,
    messages: int | None,
    stop: Any = None,
) -> WorkerResult:
    """Send this worker's share: `messages` messages or until `config.seconds`/`stop` (an Event).

    In gateway_chunked mode a started transaction is always finished, so counts are rounded up
    to whole transactions.
    """
    prefix = f"{config.msg_id_prefix}{worker}-"
    result = WorkerResult(worker=worker, prefix=prefix)
    seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**32)
    factory = PayloadFactory(config, prefix, random.Random(seed + worker))  # noqa: S311 - test data, not secrets
    publisher = _publisher(config, devices, worker)
    bucket = TokenBucket(rate)
    per_message = config.readings_per_message
    deadline = time.monotonic() + config.seconds if config.seconds is not None else math.inf
    device_index = 0
    try:
        while True:
            if messages is not None and result.attempted >= messages:
                break
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                break
            device = devices[device_index % len(devices)]
            device_index += 1
            prebuilt = factory.transaction(device) if config.mode == "gateway_chunked" else None
            for index in range(len(prebuilt) if prebuilt else 1):
                while (wait := bucket.wait_time()) > 0:
                    publisher.poll(min(wait, 0.05))
                # Endpoint and gateway messages are stamped at the moment they go out.
                payload, readings = prebuilt[index] if prebuilt else (factory.single(device), per_message)
                seq = factory.seq - (len(prebuilt) - index if prebuilt else 1)
                now = time.time()
                if not result.first_send:
                    result.first_send = now
                result.attempted += 1
                if publisher.publish(device, payload):
                    result.last_send = now
                    result.readings += readings
                else:
                    result.failed_seqs.append(seq)
                # Read acknowledgements now and then so the window rarely fills.
                if result.attempted % 64 == 0:
                    publisher.poll(0)
        publisher.flush(config.ack_timeout)
        unacked = publisher.outstanding()
        if unacked:
            _note_error(publisher, f"{unacked} messages not acknowledged within {config.ack_timeout:.0f} s")
            publisher.errors += unacked - 1
    finally:
        publisher.close()
    result.sent = publisher.sent
    result.acked = publisher.acked
    result.errors = publisher.errors
    result.error_samples = publisher.error_samples
    result.reconnects = getattr(publisher, "reconnects", 0)
    return result


def worker_main() -> None:
    """Entry point of a worker process: pickled arguments on stdin, pickled WorkerResult on stdout."""
    # The parent turns Ctrl-C into SIGTERM for its workers; the worker then finishes and reports.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    # Only our own parent writes this pipe (see _start_worker).
    config, worker, devices, rate, messages = pickle.loads(sys.stdin.buffer.read())  # noqa: S301
    if config.nice > 0:
        os.nice(config.nice)
    try:
        result = run_worker(config, worker, devices, rate=rate, messages=messages, stop=stop)
    except Exception as exc:
        log.exception("simulator worker %d failed", worker)
        result = WorkerResult(
            worker=worker, prefix=f"{config.msg_id_prefix}{worker}-", errors=1, error_samples=[f"failed: {exc!r}"]
        )
    sys.stdout.buffer.write(pickle.dumps(result))
    sys.stdout.flush()


def _start_worker(args: tuple[Any, ...]) -> subprocess.Popen[bytes]:
    # A fresh interpreter rather than multiprocessing: spawn re-imports the caller's __main__
    # (a script without a main guard forks itself again) and fork copies the caller's threads'
    # locks and open connections (Django, paho) into the child.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    process = subprocess.Popen(
        [sys.executable, "-c", "from devtools.simulator import worker_main; worker_main()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=PROJECT_ROOT,
        env=env,
    )
    assert process.stdin is not None
    process.stdin.write(pickle.dumps(args))
    process.stdin.close()
    return process


def _collect(process: subprocess.Popen[bytes], worker: int, prefix: str, into: dict[int, WorkerResult]) -> None:
    assert process.stdout is not None
    data = process.stdout.read()
    process.wait()
    try:
        into[worker] = pickle.loads(data)  # noqa: S301 - our own worker's output
    except (pickle.UnpicklingError, EOFError, ValueError):
        into[worker] = WorkerResult(
            worker=worker,
            prefix=prefix,
            errors=1,
            error_samples=[f"worker {worker} exited with code {process.returncode}"],
        )


def _split(total: int | None, parts: int) -> list[int | None]:
    if total is None:
        return [None] * parts
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@contextlib.contextmanager
def _sigint_sets(stop: threading.Event) -> Iterator[None]:
    """While running in the main thread, Ctrl-C sets `stop` (a second one interrupts)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_simulation(config: SimulatorConfig, stop: threading.Event | None = None) -> SimulatorResult:
    """Run the simulator (in this process for one worker, else in worker processes) and report.

    Setting `stop` ends the run early (messages in flight are still awaited); so does Ctrl-C.
    """
    config.validate()
    if not config.msg_id_prefix:
        config.msg_id_prefix = f"sim{uuid.uuid4().hex[:8]}-"
    processes = min(config.processes, len(config.devices))
    shares = [config.devices[i::processes] for i in range(processes)]
    counts = _split(config.messages, processes)
    rate = config.rate / processes
    stop = stop or threading.Event()
    if processes == 1:
        with _sigint_sets(stop):
            return SimulatorResult(config, [run_worker(config, 0, shares[0], rate=rate, messages=counts[0], stop=stop)])

    collected: dict[int, WorkerResult] = {}
    with _sigint_sets(stop):
        workers = [_start_worker((config, i, shares[i], rate, counts[i])) for i in range(processes)]
        readers = [
            threading.Thread(target=_collect, args=(w, i, f"{config.msg_id_prefix}{i}-", collected), daemon=True)
            for i, w in enumerate(workers)
        ]
        for reader in readers:
            reader.start()
        stopping = False
        while any(reader.is_alive() for reader in readers):
            if stop.is_set() and not stopping:
                stopping = True
                for process in workers:
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM)
            for reader in readers:
                reader.join(0.1)
    return SimulatorResult(config, [collected[i] for i in range(processes)])
