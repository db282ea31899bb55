"""Fleet simulator: one MQTT connection per device, as a real fleet is (`manage.py simulate --fleet`,
`make fleet-bench`).

Every device has its own connection (plain MQTT, or mutual TLS with the device's own certificate),
a persistent session (clean session off), publishes one endpoint message at QoS 1 every
`interval` seconds with `jitter` (each gap drawn from interval * [1 - jitter, 1 + jitter], the
first at a random phase after its first connection, so the fleet does not publish in lockstep),
and when the connection goes it reconnects with jittered exponential backoff ("full jitter": a delay drawn from
[0, min(cap, base * 2^attempt)]). Messages it has no PUBACK for are sent again, with their packet
id and the DUP flag, on the next connection; what it measures while disconnected waits in its
queue. Every msg_id the broker acknowledged is recorded for the loss checker.

Ten thousand connections do not fit a thread each (paho's loop_start): each worker process runs
one asyncio event loop with a small hand-written MQTT 3.1.1 client (CONNECT, PUBLISH QoS 1,
PUBACK, PINGREQ, DISCONNECT; nothing else is needed by a publishing device), and a few worker
processes share the fleet. One timer heap per process schedules every device's messages, so an
idle device costs a socket and a coroutine, no timer of its own.

Plain functions and dataclasses, no Django: worker processes import this module alone. Workers
report their state once a second on stdout (one JSON line each, which `run_fleet`'s `on_status`
sees) and write their result to a JSON file at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import os
import random
import signal
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from devtools.simulator import TOPIC, SimulatorError, TlsIdentity

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONNECT_TIMEOUT = 30.0  # TCP + TLS handshake + CONNACK, on a broker busy with a reconnect storm
STATUS_INTERVAL = 1.0
MAX_FAILURE_SAMPLES = 5


@dataclass
class FleetConfig:
    """The fleet to simulate; `processes` worker processes share `devices`."""

    devices: list[str]
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    # Per device: certificate, key and CA (mqtts:// URLs); empty for plain MQTT.
    tls: dict[str, TlsIdentity] = field(default_factory=dict)
    interval: float = 10.0
    jitter: float = 0.1
    seconds: float | None = None
    processes: int = 1
    keepalive: int = 60
    msg_id_prefix: str = "fleet-"
    # Connection attempts in progress at once per process: a broker's listen backlog is small
    # (Mosquitto's is 100), and SYNs beyond it are retried by the kernel only after a second.
    connect_concurrency: int = 64
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    # After the stop: how long devices get to send what they queued and have it acknowledged.
    ack_timeout: float = 60.0
    seed: int | None = None

    def validate(self) -> None:
        if not self.devices:
            raise SimulatorError("no devices to simulate")
        scheme = urlsplit(self.mqtt_url).scheme
        if scheme not in ("mqtt", "mqtts"):
            raise SimulatorError("the fleet's broker URL must be mqtt:// or mqtts://")
        if scheme == "mqtts":
            missing = [d for d in self.devices if d not in self.tls]
            if missing:
                raise SimulatorError(f"mqtts: no certificate for {', '.join(missing[:5])}")
        if self.interval <= 0 or not 0 <= self.jitter < 1:
            raise SimulatorError("interval must be > 0 and jitter in [0, 1)")
        if self.processes < 1 or self.connect_concurrency < 1 or self.keepalive < 1:
            raise SimulatorError("processes, connect concurrency and keepalive must be >= 1")
        if not 0 < self.backoff_base <= self.backoff_cap:
            raise SimulatorError("backoff: 0 < base <= cap")


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before reconnect attempt `attempt` (1, 2, ...): full jitter, drawn from
    [0, min(cap, base * 2^(attempt-1))], so a fleet that lost its broker at once comes back
    spread out rather than in synchronized waves."""
    return rng.uniform(0.0, min(cap, base * 2 ** max(0, attempt - 1)))


def next_gap(interval: float, jitter: float, rng: random.Random) -> float:
    """Seconds until a device's next message."""
    return interval * rng.uniform(1.0 - jitter, 1.0 + jitter)


# --------------------------------------------------------------------------- MQTT 3.1.1 packets


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def connect_packet(client_id: str, keepalive: int, clean_session: bool) -> bytes:
    """CONNECT, protocol level 4 (3.1.1), no will, no username (mTLS: the certificate CN is)."""
    cid = client_id.encode()
    flags = 0x02 if clean_session else 0x00
    body = b"\x00\x04MQTT\x04" + bytes((flags,)) + struct.pack("!H", keepalive) + struct.pack("!H", len(cid)) + cid
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: bytes, packet_id: int, payload: bytes, dup: bool = False) -> bytes:
    """PUBLISH at QoS 1."""
    variable = struct.pack("!H", len(topic)) + topic + struct.pack("!H", packet_id)
    return bytes((0x3A if dup else 0x32,)) + _varint(len(variable) + len(payload)) + variable + payload


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def parse_packets(buffer: bytearray) -> Iterator[tuple[int, bytes]]:
    """(first byte, body) of each complete packet at the start of buffer; consumed bytes are removed."""
    while len(buffer) >= 2:
        length, multiplier, pos = 0, 1, 1
        while True:
            if pos >= len(buffer):
                return
            byte = buffer[pos]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            pos += 1
            if not byte & 0x80:
                break
            if pos > 4:
                raise ValueError("malformed remaining length")
        if len(buffer) < pos + length:
            return
        first, body = buffer[0], bytes(buffer[pos : pos + length])
        del buffer[: pos + length]
        yield first, body


class Refused(Exception):
    """The broker answered CONNECT with a non-zero return code."""


# --------------------------------------------------------------------------- one worker process


@dataclass
class WorkerStatus:
    """A worker's state, reported once a second (and summed over workers by run_fleet)."""

    worker: int = 0
    devices: int = 0
    connected: int = 0
    ever_connected: int = 0
    generated: int = 0
    sent: int = 0
    acked: int = 0
    connects: int = 0
    connect_failures: int = 0
    lost_connections: int = 0
    queued: int = 0
    inflight: int = 0
    done: bool = False


class Device:
    """One device's state and its connection coroutine."""

    def __init__(self, worker: FleetWorker, logical_id: str, index: int) -> None:
        self.worker = worker
        self.logical_id = logical_id
        self.topic = TOPIC.format(logical_id).encode()
        self.index = index
        self.seq = 0
        self.last_ts = 0
        self.queue: deque[tuple[str, bytes]] = deque()  # measured, not yet sent on this connection
        self.inflight: dict[int, tuple[str, bytes]] = {}  # packet id -> (msg_id, payload): no PUBACK yet
        self.acked: list[str] = []
        self.connected_at: list[float] = []  # wall-clock time of each CONNACK
        self.wake = asyncio.Event()
        self.connected = False
        self.next_packet_id = 0
        self._ssl: ssl.SSLContext | None = None

    def measure(self) -> None:
        """A new reading: queue one message stamped now (ts strictly increasing per device)."""
        ts = max(int(time.time() * 1000), self.last_ts + 1)
        self.last_ts = ts
        msg_id = f"{self.worker.prefix}{self.index}.{self.seq}"
        self.seq += 1
        rng = self.worker.rng
        document = {
            "msg_id": msg_id,
            "ts": ts,
            "values": {
                "temperature": round(rng.uniform(18.0, 26.0), 2),
                "humidity": round(rng.uniform(30.0, 60.0), 1),
                "pressure": round(rng.uniform(990.0, 1030.0), 1),
                "battery": rng.randint(20, 100),
            },
        }
        self.queue.append((msg_id, orjson.dumps(document)))
        self.worker.status.generated += 1
        self.wake.set()

    def ssl_context(self) -> ssl.SSLContext | None:
        identity = self.worker.config.tls.get(self.logical_id)
        if identity is None or not self.worker.tls:
            return None
        if self._ssl is None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=identity.ca)
            context.load_cert_chain(identity.cert, identity.key)
            self._ssl = context
        return self._ssl

    def _packet_id(self) -> int:
        while True:
            self.next_packet_id = self.next_packet_id % 65535 + 1
            if self.next_packet_id not in self.inflight:
                return self.next_packet_id

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytearray]:
        worker = self.worker
        reader, writer = await asyncio.open_connection(
            worker.host, worker.port, ssl=self.ssl_context(), server_hostname=worker.host if worker.tls else None
        )
        try:
            writer.write(connect_packet(self.logical_id, worker.config.keepalive, clean_session=False))
            buffer = bytearray()
            while True:
                data = await reader.read(4096)
                if not data:
                    raise ConnectionError("the broker closed the connection before CONNACK")
                buffer += data
                for first, body in parse_packets(buffer):
                    if first >> 4 != 2:
                        continue
                    if len(body) < 2 or body[1] != 0:
                        raise Refused(f"CONNACK return code {body[1] if len(body) > 1 else '?'}")
                    return reader, writer, buffer
        except BaseException:
            writer.close()
            raise

    async def run(self) -> None:
        worker, status = self.worker, self.worker.status
        attempt = 0
        while not (worker.stopping and not self.queue and not self.inflight) and not worker.abandoned:
            try:
                # The timeout runs from the attempt's start, not from the wait for a turn.
                async with worker.connecting:
                    reader, writer, buffer = await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT)
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError, Refused, ValueError) as exc:
                status.connect_failures += 1
                worker.note_failure(f"{self.logical_id}: {type(exc).__name__}: {exc}")
                attempt += 1
                await worker.sleep(
                    backoff_delay(attempt, worker.config.backoff_base, worker.config.backoff_cap, worker.rng)
                )
                continue
            attempt = 0
            self.connected_at.append(time.time())
            if len(self.connected_at) == 1:
                status.ever_connected += 1
                worker.start_measuring(self.index)
            status.connects += 1
            status.connected += 1
            self.connected = True
            try:
                await self._session(reader, writer, buffer)
            finally:
                self.connected = False
                status.connected -= 1
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 5)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, buffer: bytearray) -> None:
        worker, status = self.worker, self.worker.status
        # Unacknowledged messages of the last connection first, with their packet ids (3.1.1 §4.4).
        for packet_id, (_, payload) in self.inflight.items():
            writer.write(publish_packet(self.topic, packet_id, payload, dup=True))
            status.sent += 1
        reading = asyncio.ensure_future(self._read(reader, buffer))
        last_write = time.monotonic()
        ping_after = worker.config.keepalive * 0.75
        try:
            while not reading.done():
                if worker.stopping and not self.queue and not self.inflight:
                    writer.write(DISCONNECT)
                    await writer.drain()
                    return
                while self.queue:
                    msg_id, payload = self.queue.popleft()
                    packet_id = self._packet_id()
                    self.inflight[packet_id] = (msg_id, payload)
                    writer.write(publish_packet(self.topic, packet_id, payload))
                    status.sent += 1
                    last_write = time.monotonic()
                idle = time.monotonic() - last_write
                if idle >= ping_after:
                    writer.write(PINGREQ)
                    last_write = time.monotonic()
                    idle = 0.0
                await writer.drain()
                self.wake.clear()
                wake = asyncio.ensure_future(self.wake.wait())
                await asyncio.wait([reading, wake], timeout=ping_after - idle, return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
        except (OSError, ssl.SSLError, ConnectionError):
            pass
        finally:
            if not reading.done():
                reading.cancel()
        if not (worker.stopping and not self.queue and not self.inflight):
            status.lost_connections += 1

    async def _read(self, reader: asyncio.StreamReader, buffer: bytearray) -> None:
        status = self.worker.status
        keepalive = self.worker.config.keepalive
        while True:
            for first, body in parse_packets(buffer):
                if first >> 4 == 4 and len(body) >= 2:  # PUBACK
                    entry = self.inflight.pop(struct.unpack("!H", body[:2])[0], None)
                    if entry is not None:
                        self.acked.append(entry[0])
                        status.acked += 1
                        if self.worker.stopping and not self.inflight:
                            self.wake.set()
            try:
                # The broker answers a PINGREQ within keepalive: silence beyond 1.5 * keepalive
                # is a dead connection (a half-open socket after the broker's host went away).
                data = await asyncio.wait_for(reader.read(4096), keepalive * 1.5)
            except (OSError, ssl.SSLError, TimeoutError):
                data = b""
            if not data:
                self.wake.set()
                return
            buffer += data


class FleetWorker:
    """One process's share of the fleet on one event loop."""

    def __init__(self, config: FleetConfig, worker: int, devices: list[str], status_out: Any = None) -> None:
        self.config = config
        self.worker = worker
        self.prefix = f"{config.msg_id_prefix}{worker}-"
        seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**32)
        self.rng = random.Random(seed + worker)  # noqa: S311 - test data and jitter, not secrets
        parts = urlsplit(config.mqtt_url)
        self.tls = parts.scheme == "mqtts"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (8883 if self.tls else 1883)
        self.devices = [Device(self, d, i) for i, d in enumerate(devices)]
        self.status = WorkerStatus(worker=worker, devices=len(devices))
        self.status_out = status_out
        self.stopping = False
        self.abandoned = False
        self.failure_samples: list[str] = []
        self._stop_event: asyncio.Event | None = None
        self._heap: list[tuple[float, int]] = []
        self._scheduled = asyncio.Event()

    def note_failure(self, text: str) -> None:
        if len(self.failure_samples) < MAX_FAILURE_SAMPLES:
            self.failure_samples.append(text)

    async def sleep(self, seconds: float) -> None:
        """Sleep, cut short by the stop (a device still reconnects to deliver what it holds)."""
        assert self._stop_event is not None
        if self.stopping:
            await asyncio.sleep(min(seconds, 1.0))
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)

    def start_measuring(self, index: int) -> None:
        """The device is on (its first connection is up): its first message comes at a random phase
        of its interval, so the fleet does not publish in lockstep."""
        heapq.heappush(self._heap, (time.monotonic() + self.rng.uniform(0, self.config.interval), index))
        self._scheduled.set()

    async def _schedule(self) -> None:
        """Every measuring device's next message, from one heap."""
        interval, jitter, heap = self.config.interval, self.config.jitter, self._heap
        while not self.stopping:
            if heap and heap[0][0] <= time.monotonic():
                due, index = heap[0]
                self.devices[index].measure()
                heapq.heapreplace(heap, (due + next_gap(interval, jitter, self.rng), index))
                continue
            self._scheduled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._scheduled.wait(), heap[0][0] - time.monotonic() if heap else 1.0)

    async def _report(self) -> None:
        while True:
            self._write_status()
            await asyncio.sleep(STATUS_INTERVAL)

    def _write_status(self) -> None:
        status = self.status
        status.queued = sum(len(d.queue) for d in self.devices)
        status.inflight = sum(len(d.inflight) for d in self.devices)
        if self.status_out is not None:
            self.status_out.write(json.dumps(asdict(status)) + "\n")
            self.status_out.flush()

    def stop(self) -> None:
        self.stopping = True
        self._scheduled.set()
        if self._stop_event is not None:
            self._stop_event.set()
        for device in self.devices:
            device.wake.set()

    async def run(self, stop: threading.Event | None = None) -> None:
        self._stop_event = asyncio.Event()
        self.connecting = asyncio.Semaphore(self.config.connect_concurrency)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, self.stop)
        # Each device's TLS context (its certificate and key loaded) before the first connects, as a
        # real device has it ready: the time to connect the fleet is then the broker's, not this.
        for device in self.devices:
            device.ssl_context()
        reporter = asyncio.ensure_future(self._report())
        scheduler = asyncio.ensure_future(self._schedule())
        tasks = [asyncio.ensure_future(d.run()) for d in self.devices]
        deadline = time.monotonic() + self.config.seconds if self.config.seconds is not None else None
        while not self.stopping:
            if deadline is not None and time.monotonic() >= deadline:
                self.stop()
            if stop is not None and stop.is_set():
                self.stop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), 0.2)
        _done, pending = await asyncio.wait(tasks, timeout=self.config.ack_timeout)
        if pending:
            self.abandoned = True
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=10)
        scheduler.cancel()
        reporter.cancel()
        self.status.done = True
        self._write_status()

    def result(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "status": asdict(self.status),
            "acked": [m for d in self.devices for m in d.acked],
            "unacked": [m for d in self.devices for m, _ in d.inflight.values()],
            "unsent": [m for d in self.devices for m, _ in d.queue],
            "connected_at": {d.logical_id: d.connected_at for d in self.devices},
            "failure_samples": self.failure_samples,
        }


def _raise_nofile() -> None:
    """One socket per device: take the hard file-descriptor limit."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def worker_main() -> None:
    """A worker process: JSON arguments on stdin, status lines on stdout, the result to a file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _raise_nofile()
    args = json.loads(sys.stdin.read())
    config = FleetConfig(**{**args["config"], "tls": {k: TlsIdentity(*v) for k, v in args["config"]["tls"].items()}})
    worker = FleetWorker(config, args["worker"], args["devices"], status_out=sys.stdout)
    asyncio.run(worker.run())
    Path(args["result"]).write_bytes(orjson.dumps(worker.result()))


# --------------------------------------------------------------------------- the fleet


@dataclass
class FleetResult:
    """What the whole fleet did; `acked` is every msg_id the broker acknowledged."""

    config: FleetConfig
    started: float  # wall clock, just before the workers started
    workers: list[dict[str, Any]]

    def _sum(self, key: str) -> int:
        return sum(int(w["status"][key]) for w in self.workers)

    @property
    def acked(self) -> list[str]:
        return [m for w in self.workers for m in w["acked"]]

    @property
    def unacked(self) -> int:
        return sum(len(w["unacked"]) + len(w["unsent"]) for w in self.workers)

    @property
    def generated(self) -> int:
        return self._sum("generated")

    @property
    def connect_failures(self) -> int:
        return self._sum("connect_failures")

    @property
    def lost_connections(self) -> int:
        return self._sum("lost_connections")

    @property
    def connected_at(self) -> dict[str, list[float]]:
        return {d: times for w in self.workers for d, times in w["connected_at"].items()}

    @property
    def failure_samples(self) -> list[str]:
        return [s for w in self.workers for s in w["failure_samples"]][:MAX_FAILURE_SAMPLES]

    def all_connected_after(self, moment: float) -> float | None:
        """Seconds from `moment` until every device had a connection made after it (None: some never did)."""
        latest = 0.0
        for times in self.connected_at.values():
            later = [t for t in times if t >= moment]
            if not later:
                return None
            latest = max(latest, later[0])
        return max(0.0, latest - moment)

    def connects_between(self, start: float, end: float) -> list[float]:
        return sorted(t for times in self.connected_at.values() for t in times if start <= t <= end)

    def summary_line(self) -> str:
        line = (
            f"fleet: devices={len(self.config.devices)} generated={self.generated} acked={len(self.acked)} "
            f"unacknowledged={self.unacked} connects={self._sum('connects')} "
            f"connect_failures={self.connect_failures} lost_connections={self.lost_connections} "
            f"processes={len(self.workers)}"
        )
        if self.failure_samples:
            line += " first failures: " + " | ".join(self.failure_samples)
        return line


def _config_json(config: FleetConfig) -> dict[str, Any]:
    data = asdict(config)
    data["tls"] = {k: [v.cert, v.key, v.ca] for k, v in config.tls.items()}
    return data


def run_fleet(
    config: FleetConfig,
    work_dir: Path,
    *,
    stop: threading.Event | None = None,
    on_status: Callable[[WorkerStatus], None] | None = None,
    pids: list[int] | None = None,
) -> FleetResult:
    """Run the fleet in `config.processes` worker processes until `config.seconds` or `stop`;
    `on_status(total)` gets the summed status of all workers about once a second; `pids`, if
    given, gets the worker processes' ids (for CPU sampling)."""
    config.validate()
    work_dir.mkdir(parents=True, exist_ok=True)
    processes = min(config.processes, len(config.devices))
    shares = [config.devices[i::processes] for i in range(processes)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    statuses: dict[int, WorkerStatus] = {}
    lock = threading.Lock()
    started = time.time()
    _raise_nofile()
    workers: list[subprocess.Popen[bytes]] = []
    result_paths = [work_dir / f"fleet-worker-{i}.json" for i in range(processes)]
    for i in range(processes):
        result_paths[i].unlink(missing_ok=True)
        process = subprocess.Popen(
            [sys.executable, "-c", "from devtools.fleet import worker_main; worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=PROJECT_ROOT,
            env=env,
        )
        assert process.stdin is not None
        process.stdin.write(
            json.dumps(
                {"config": _config_json(config), "worker": i, "devices": shares[i], "result": str(result_paths[i])}
            ).encode()
        )
        process.stdin.close()
        workers.append(process)
        if pids is not None:
            pids.append(process.pid)

    def follow(index: int, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                status = WorkerStatus(**json.loads(line))
            except (ValueError, TypeError):
                continue
            with lock:
                statuses[index] = status
                total = WorkerStatus(worker=-1)
                for s in statuses.values():
                    for key, value in asdict(s).items():
                        if key not in ("worker", "done"):
                            setattr(total, key, getattr(total, key) + value)
                total.done = len(statuses) == processes and all(s.done for s in statuses.values())
            if on_status is not None:
                on_status(total)

    readers = [threading.Thread(target=follow, args=(i, w), daemon=True) for i, w in enumerate(workers)]
    for reader in readers:
        reader.start()
    stopped = False
    try:
        while any(w.poll() is None for w in workers):
            if stop is not None and stop.is_set() and not stopped:
                stopped = True
                for w in workers:
                    if w.poll() is None:
                        w.send_signal(signal.SIGTERM)
            time.sleep(0.1)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for reader in readers:
        reader.join(5)
    results = []
    for i, path in enumerate(result_paths):
        try:
            results.append(orjson.loads(path.read_bytes()))
        except (OSError, orjson.JSONDecodeError):
            results.append(
                {
                    "worker": i,
                    "status": asdict(WorkerStatus(worker=i, devices=len(shares[i]))),
                    "acked": [],
                    "unacked": [],
                    "unsent": [],
                    "connected_at": {},
                    "failure_samples": [f"worker {i} exited with {workers[i].returncode} and wrote no result"],
                }
            )
    return FleetResult(config=config, started=started, workers=results)
