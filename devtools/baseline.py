"""The bare chain `make bench` measures the pipeline against (issue 14).

The same parts as the pipeline and nothing else: a private Mosquitto with our shipped config →
a minimal paho subscriber (persistent session, QoS 1, manual acknowledgement) that packs what
arrived into envelopes of up to ENVELOPE_MESSAGES, publishes them to JetStream without awaiting
each PubAck (a bounded window of `publish_async` futures) and acknowledges the MQTT messages of
an envelope once its PubAck is in → a stream of its own on the run's private nats-server → a
minimal pull consumer that decodes each message's JSON for its msg_id and ts and writes what one
fetch of up to FETCH_ENVELOPES envelopes brought within BATCH_WAIT by binary COPY into an
unindexed table (schema `bench_baseline`, one table per run, dropped afterwards), then
acknowledges. No routing, validation, tenancy,
readings or dead letters: what is left is the cost of the parts themselves, so the pipeline's
rate divided by this one's (`ratio_to_baseline`, from the same run on the same machine) holds
from one machine to the next where absolute figures move by 1.5-2 times.

The bridge and the consumer run as child processes (`python -m devtools.baseline bridge|consume`,
configured by BASELINE_* environment variables) so that their CPU is sampled as the pipeline's
is. `BaselineChain` is what the bench drives: start, warm up, offer the load, drain, measure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from devtools.measure import (
    DRAIN_IDLE_SECONDS,
    PidSource,
    ProcSampler,
    cost_report,
    like_prefix,
    percentile,
    postgres_pids,
    sustained_rate,
)

STREAM_PREFIX = "BASELINE"
SCHEMA = "bench_baseline"
READY = "baseline ready"
ENVELOPE_MESSAGES = 500  # as the bridge's ARGUS_BRIDGE_ENVELOPE_MESSAGES
PUBLISH_WINDOW = 64  # envelopes awaiting their PubAck
PUBACK_TIMEOUT = 30.0  # then the envelope is published again (same Nats-Msg-Id)
READ_BURST = 256  # MQTT packets read per readable event
KEEPALIVE = 600  # seconds (see run_bridge)
LINGER = 0.02  # seconds an envelope waits to fill, as the bridge's ARGUS_BRIDGE_LINGER_SECONDS
BATCH_WAIT = 0.05  # seconds a batch waits to fill (the prototype's 50 ms)
FETCH_ENVELOPES = 64  # per batch: up to 32,000 device messages per COPY and commit
_RECORD = struct.Struct("!HI")  # topic length, payload length

log = logging.getLogger("devtools.baseline")


def encode(messages: Sequence[tuple[bytes, bytes]]) -> bytes:
    """An envelope: per message its topic and payload, each behind its length."""
    parts: list[bytes] = []
    for topic, payload in messages:
        parts += (_RECORD.pack(len(topic), len(payload)), topic, payload)
    return b"".join(parts)


def decode(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (topic, payload) pairs of an envelope."""
    out, offset = [], 0
    while offset < len(data):
        topic_len, payload_len = _RECORD.unpack_from(data, offset)
        offset += _RECORD.size
        topic = data[offset : offset + topic_len]
        offset += topic_len
        out.append((topic, data[offset : offset + payload_len]))
        offset += payload_len
    return out


def stream_name(run_id: str) -> str:
    return f"{STREAM_PREFIX}_{run_id}"


def subject(run_id: str) -> str:
    return f"baseline.{run_id}"


def table_name(run_id: str) -> str:
    return f"{SCHEMA}.raw_{run_id}"


# --------------------------------------------------------------------------- the child processes


class _Stopping:
    """Set by SIGTERM/SIGINT; the loops check it (the handler only sets a flag)."""

    def __init__(self) -> None:
        self.flag = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, signum: int, frame: Any) -> None:
        self.flag = True


async def run_bridge(mqtt_url: str, nats_url: str, run_id: str) -> None:
    """MQTT → JetStream until SIGTERM, then publish what is held and stop.

    paho runs on the asyncio loop through its public external-loop API (socket callbacks,
    `loop_read`/`loop_write`/`loop_misc`), not in a thread of its own: acknowledging a message
    then never crosses threads (the prototype: 20,000 instead of 15,000 msgs/s)."""
    import nats
    import nats.errors
    import nats.js.errors
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    stopping = _Stopping()
    loop = asyncio.get_running_loop()
    nc = await nats.connect(nats_url, max_reconnect_attempts=-1)
    js = nc.jetstream(publish_async_max_pending=PUBLISH_WINDOW * 2)
    incoming: deque[mqtt.MQTTMessage] = deque()
    subscribed = asyncio.Event()
    parts = urlparse(mqtt_url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"baseline-bridge-{run_id}", clean_session=False)
    client.manual_ack_set(True)

    def readable() -> None:
        # One readable event may carry many packets; loop_read takes one of them at a time. At
        # most READ_BURST per event, so a socket that never runs dry cannot starve the loop (the
        # reader is level-triggered: the loop calls again).
        sock = client.socket()
        for _ in range(READ_BURST):
            if sock is None or client.loop_read() != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            if not select.select([sock], [], [], 0)[0]:
                break

    def on_socket_open(c: mqtt.Client, userdata: Any, sock: Any) -> None:
        loop.add_reader(sock, readable)

    def on_socket_close(c: mqtt.Client, userdata: Any, sock: Any) -> None:
        loop.remove_reader(sock)
        loop.remove_writer(sock)

    def on_register_write(c: mqtt.Client, userdata: Any, sock: Any) -> None:
        loop.add_writer(sock, c.loop_write)

    def on_unregister_write(c: mqtt.Client, userdata: Any, sock: Any) -> None:
        loop.remove_writer(sock)

    def on_subscribe(*_: Any) -> None:
        subscribed.set()

    client.on_socket_open = on_socket_open
    client.on_socket_close = on_socket_close
    client.on_socket_register_write = on_register_write
    client.on_socket_unregister_write = on_unregister_write
    client.on_connect = lambda c, *_: c.subscribe("devices/+/telemetry", qos=1)
    # No reconnect: the bench fails the run (nothing more is stored) and this line says why.
    client.on_disconnect = lambda c, u, flags, reason, props: log.warning("mqtt disconnected: %s", reason)
    client.enable_logger(logging.getLogger("devtools.baseline.paho"))
    logging.getLogger("devtools.baseline.paho").setLevel(logging.WARNING)
    client.on_subscribe = on_subscribe
    stats = {"received": 0, "published": 0}

    def on_message(c: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        stats["received"] += 1
        incoming.append(message)

    client.on_message = on_message
    # A long keepalive: paho 2.1 with an external loop counts a write as traffic only when it
    # leaves packets queued, so with PUBACKs flowing it sends a PINGREQ every keepalive, and the
    # PINGRESP queues in the broker behind the session's backlog: with 30 s a flat-out run's
    # backlog held it back beyond the keepalive and paho closed the connection (Keep alive timeout).
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=KEEPALIVE)

    async def keepalive() -> None:
        ticks = 0
        while True:
            client.loop_misc()
            await asyncio.sleep(1.0)
            ticks += 1
            if ticks % 10 == 0:
                log.info("received %d, published %d, holding %d", stats["received"], stats["published"], len(incoming))

    misc = asyncio.ensure_future(keepalive())
    await subscribed.wait()
    print(READY, flush=True)
    window = asyncio.Semaphore(PUBLISH_WINDOW)
    counter = 0

    async def publish(batch: list[mqtt.MQTTMessage], msg_id: str) -> None:
        payload = encode([(m.topic.encode(), m.payload) for m in batch])
        while True:
            try:
                future = await js.publish_async(subject(run_id), payload, headers={"Nats-Msg-Id": msg_id})
                # Not wait_for: cancelling nats-py's future would leave its pending-window slot taken.
                await asyncio.wait({future}, timeout=PUBACK_TIMEOUT)
                if future.done() and future.exception() is None:
                    break
                problem: Any = future.exception() if future.done() else "no PubAck in time"
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                problem = exc
            # The duplicate window absorbs the publish again.
            log.warning("baseline publish %s failed, again: %r", msg_id, problem)
            await asyncio.sleep(0.1)
        stats["published"] += len(batch)
        for m in batch:
            client.ack(m.mid, m.qos)

    tasks: set[asyncio.Task[None]] = set()
    filling_since = time.monotonic()
    while not (stopping.flag and not incoming):
        # As the bridge does: an envelope fills for up to LINGER seconds unless it is full.
        if not incoming or (
            len(incoming) < ENVELOPE_MESSAGES and time.monotonic() - filling_since < LINGER and not stopping.flag
        ):
            await asyncio.sleep(0.002)
            continue
        batch = [incoming.popleft() for _ in range(min(ENVELOPE_MESSAGES, len(incoming)))]
        filling_since = time.monotonic()
        await window.acquire()
        counter += 1
        task = asyncio.ensure_future(publish(batch, f"{run_id}-{counter}"))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(lambda _: window.release())
    await asyncio.gather(*tasks)
    client.disconnect()
    client.loop_write()
    misc.cancel()
    await nc.drain()


async def run_consumer(nats_url: str, dsn: str, run_id: str) -> None:
    """JetStream → COPY BINARY until SIGTERM (after the batch in hand is stored and acknowledged)."""
    import nats
    import orjson
    import psycopg
    from nats.errors import TimeoutError as NatsTimeout

    stopping = _Stopping()
    nc = await nats.connect(nats_url, max_reconnect_attempts=-1)
    js = nc.jetstream()
    sub = await js.pull_subscribe(subject(run_id), durable="baseline", stream=stream_name(run_id))
    conn = psycopg.connect(dsn)
    copy_sql = f"COPY {table_name(run_id)} (msg_id, device, ts_ms, stored_at, payload) FROM STDIN (FORMAT BINARY)"
    print(READY, flush=True)
    stored, logged_at = 0, time.monotonic()
    while not stopping.flag:
        try:
            # nats-py's fetch(n) collects until n messages or the timeout: BATCH_WAIT bounds a batch's
            # wait as the consumer's batch window does. Its own timeout too: nats-server 2.9
            # sometimes ends a pull request without a status.
            msgs = await asyncio.wait_for(sub.fetch(FETCH_ENVELOPES, timeout=BATCH_WAIT), BATCH_WAIT + 2.0)
        except (TimeoutError, NatsTimeout):
            continue
        rows: list[tuple[str, str, float, bytes]] = []
        for msg in msgs:
            for topic, payload in decode(msg.data):
                doc = orjson.loads(payload)
                rows.append((doc["msg_id"], topic.split(b"/")[1].decode(), float(doc["ts"]), payload))
        stored_at = datetime.now(UTC)
        with conn.cursor() as cursor, cursor.copy(copy_sql) as copy:
            copy.set_types(["text", "text", "float8", "timestamptz", "bytea"])
            for msg_id, device, ts_ms, payload in rows:
                copy.write_row((msg_id, device, ts_ms, stored_at, payload))
        conn.commit()
        for msg in msgs:
            await msg.ack()
        stored += len(rows)
        if time.monotonic() - logged_at >= 10:
            logged_at = time.monotonic()
            log.info("stored %d", stored)
    conn.close()
    await nc.drain()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = os.environ
    run_id, nats_url = env["BASELINE_RUN_ID"], env["BASELINE_NATS_URL"]
    if args == ["bridge"]:
        asyncio.run(run_bridge(env["BASELINE_MQTT_URL"], nats_url, run_id))
    elif args == ["consume"]:
        asyncio.run(run_consumer(nats_url, env["BASELINE_DSN"], run_id))
    else:
        print("usage: python -m devtools.baseline bridge|consume (BASELINE_* in the environment)", file=sys.stderr)
        return 2
    print("baseline stopped", flush=True)
    return 0


# --------------------------------------------------------------------------- what the bench drives


class BaselineChain:
    """One run of the bare chain: its Mosquitto, stream, table and two child processes."""

    def __init__(self, *, run_id: str, nats_url: str, log_dir: Path, log: Callable[[str], None]) -> None:
        self.run_id = run_id
        self.nats_url = nats_url
        self.log_dir = log_dir
        self.log = log
        self.application_name = f"argus-baseline-{run_id}"
        self.broker: Any = None
        self.supervisor: Any = None
        self._table_made = self._stream_made = False

    @property
    def mqtt_url(self) -> str:
        return str(self.broker.url)

    def start(self) -> None:
        from django.db import connection

        from devtools.services import start_mosquitto
        from devtools.supervisor import Supervisor, log_says

        self.broker = start_mosquitto(workdir=self.log_dir / "baseline-mosquitto")
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            cursor.execute(
                f"CREATE TABLE {table_name(self.run_id)} "
                "(msg_id text NOT NULL, device text NOT NULL, ts_ms float8, stored_at timestamptz NOT NULL, "
                "payload bytea NOT NULL)"
            )
        self._table_made = True
        asyncio.run(self._make_stream())
        self._stream_made = True
        env = dict(
            os.environ,
            BASELINE_RUN_ID=self.run_id,
            BASELINE_NATS_URL=self.nats_url,
            BASELINE_MQTT_URL=self.broker.url,
            BASELINE_DSN=self.dsn(),
        )
        self.supervisor = Supervisor(self.log_dir, env)
        argv = [sys.executable, "-m", "devtools.baseline"]
        self.supervisor.add("baseline-consumer", [*argv, "consume"], ready=log_says(READY))
        self.supervisor.add("baseline-bridge", [*argv, "bridge"], ready=log_says(READY))
        self.supervisor.start()
        took = self.supervisor.wait_ready(60.0)
        self.log(f"baseline chain ready in {took:.1f} s (broker {self.broker.url}, stream {stream_name(self.run_id)})")

    def dsn(self) -> str:
        from django.db import connection
        from psycopg.conninfo import make_conninfo

        params = connection.get_connection_params()
        keep = {k: v for k, v in params.items() if k in ("host", "port", "dbname", "user", "password") and v}
        return make_conninfo(**{k: str(v) for k, v in keep.items()}, application_name=self.application_name)

    async def _make_stream(self) -> None:
        import nats
        from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

        nc = await nats.connect(self.nats_url)
        js = nc.jetstream()
        # As the pipeline's telemetry stream: a work queue on file storage with a duplicate window.
        await js.add_stream(
            StreamConfig(
                name=stream_name(self.run_id),
                subjects=[subject(self.run_id)],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=120.0,
            )
        )
        await js.add_consumer(
            stream_name(self.run_id), ConsumerConfig(durable_name="baseline", ack_wait=60.0, max_ack_pending=20000)
        )
        await nc.close()

    async def _drop_stream(self) -> None:
        import nats

        nc = await nats.connect(self.nats_url)
        await nc.jetstream().delete_stream(stream_name(self.run_id))
        await nc.close()

    def pids(self) -> dict[str, list[int]]:
        """The processes of the chain (the PostgreSQL backend: see `backend_pids`)."""
        return {
            "bridge": [self.supervisor.child("baseline-bridge").pid],
            "ingest": [self.supervisor.child("baseline-consumer").pid],
            "mosquitto": [self.broker.pid],
        }

    def check_alive(self) -> None:
        self.supervisor.check_alive()

    def count(self, prefix: str) -> int:
        from django.db import connection

        with connection.cursor() as cursor:
            if prefix:
                sql = f"SELECT count(*) FROM {table_name(self.run_id)} WHERE msg_id LIKE %s"
                cursor.execute(sql, [like_prefix(prefix)])
            else:
                cursor.execute(f"SELECT count(*) FROM {table_name(self.run_id)}")
            return int(cursor.fetchone()[0])

    def rows(self, prefix: str) -> list[tuple[str, float, float]]:
        """(msg_id, stored_at ms, device ts ms) of the stored messages whose msg_id starts with prefix."""
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT msg_id, extract(epoch FROM stored_at) * 1000, ts_ms FROM {table_name(self.run_id)} "
                "WHERE msg_id LIKE %s",
                [like_prefix(prefix)],
            )
            return [(r[0], float(r[1]), float(r[2])) for r in cursor.fetchall()]

    def truncate(self) -> None:
        """Empty the table (after the warm-up, so the drain's count scans only the measured load)."""
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {table_name(self.run_id)}")

    def measure(
        self, *, devices: list[str], make_config: Callable[..., Any], load: Any, nats_pid: int | None
    ) -> dict[str, Any]:
        """Warm up, offer `load` (the pipeline's simulator config, sent to this chain's broker),
        wait for the drain and report as the bench reports the pipeline, keys prefixed `baseline_`.

        make_config(devices, prefix, **overrides) builds the simulator config the bench uses."""
        from devtools.simulator import run_simulation

        run = self.run_id
        started = time.monotonic()
        for attempt in range(60):
            # Until the bridge's subscription is in place the broker drops what it gets: send again.
            run_simulation(make_config(devices[:1], f"{run}-BP{attempt}-", mqtt_url=self.mqtt_url, messages=1))
            if self._wait_count(f"{run}-BP", 1, 2.0):
                break
        else:
            raise RuntimeError("no probe message stored by the baseline chain")
        warm = run_simulation(
            make_config(devices, f"{run}-BW", mqtt_url=self.mqtt_url, messages=len(devices), processes=1)
        )
        if not self._wait_count(f"{run}-BW", warm.sent, 90.0):
            raise RuntimeError("baseline warm-up messages not all stored within 90 s")
        self.truncate()
        self.log(f"baseline ready and warm after {time.monotonic() - started:.1f} s; offering the same load")
        prefix = f"{run}-BL"
        load.msg_id_prefix = prefix
        load.mqtt_url = self.mqtt_url
        pids: dict[str, PidSource] = {**self.pids(), **postgres_pids(self.application_name)}
        if nats_pid is not None:
            pids["nats"] = [nats_pid]
        pids["load_generator"] = [os.getpid()]
        sampler = ProcSampler(pids, reaped=["load_generator"])
        sampler.mark_start()
        result = run_simulation(load)
        self.log("baseline " + result.summary_line())
        # The drain: as long as rows keep coming, give up after DRAIN_IDLE_SECONDS without one.
        stored, last_change, drain_complete = -1, time.monotonic(), False
        drain_started = last_log = time.monotonic()
        while True:
            # The table holds only the load now (truncated after the warm-up): no filter to scan for.
            now_stored = self.count("")
            if now_stored != stored:
                stored, last_change = now_stored, time.monotonic()
            if stored >= result.sent:
                drain_complete = True
                break
            if time.monotonic() - last_change > DRAIN_IDLE_SECONDS:
                self.log(f"baseline draining: nothing stored for {DRAIN_IDLE_SECONDS:.0f} s, giving up")
                break
            if time.monotonic() - last_log >= 30:
                last_log = time.monotonic()
                self.log(f"baseline draining: {stored} of {result.sent} stored after {last_log - drain_started:.0f} s")
            self.check_alive()
            time.sleep(1.0)
        sampler.mark_end()
        exit_codes = self.stop()
        expected = set(result.msg_ids())
        rows = self.rows(prefix)
        seen: set[str] = set()
        duplicates, latencies = 0, []
        for msg_id, stored_ms, ts_ms in rows:
            if msg_id not in expected or msg_id in seen:
                duplicates += 1
                continue
            seen.add(msg_id)
            latencies.append(stored_ms - ts_ms)
        latencies.sort()
        stored_times = sorted(r[1] for r in rows)
        rate = sustained_rate(
            stored=len(seen),
            expected=len(expected),
            first_send=result.first_send,
            last_send=result.last_send,
            first_stored=stored_times[0] / 1000 if stored_times else 0.0,
            last_stored=stored_times[-1] / 1000 if stored_times else 0.0,
        )
        report: dict[str, Any] = {
            "baseline_offered_msgs_per_s": round(result.sent / result.duration, 1) if result.duration > 0 else 0.0,
            "baseline_msgs_per_s": round(rate.msgs_per_s, 1),
            "baseline_p50_latency_ms": round(percentile(latencies, 0.50), 1),
            "baseline_p99_latency_ms": round(percentile(latencies, 0.99), 1),
            "baseline_lost": len(expected - seen),
            "baseline_duplicates": duplicates,
            "baseline_sent": result.sent,
            "baseline_acked_by_broker": result.acked,
            "baseline_sim_errors": result.errors,
            "baseline_stored": len(seen),
            "baseline_send_seconds": round(result.duration, 2),
            "baseline_drain_seconds": round(rate.drain_seconds, 2),
            "baseline_drain_complete": drain_complete,
            "baseline_kept_up": rate.kept_up,
            "baseline_sustained_basis": rate.basis,
            "baseline_exit_codes": exit_codes,
            "baseline_cpu_cores_machine": round(sampler.machine_cores(), 2),
            **cost_report(sampler, len(seen), "baseline_", "baseline_core_ms_per_1k_msgs"),
        }
        return report

    def _wait_count(self, prefix: str, want: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(prefix) >= want:
                return True
            self.check_alive()
            time.sleep(0.1)
        return False

    def stop(self) -> dict[str, int | None]:
        """SIGTERM the bridge first, then the consumer; their exit codes."""
        if self.supervisor is None:
            return {}
        codes = self.supervisor.stop([["baseline-bridge"]], 60.0)
        self.supervisor = None
        return codes

    def close(self) -> None:
        """Stop everything and drop the table and the stream (also after a failed run)."""
        from django.db import connection

        self.stop()
        try:
            if self._stream_made:
                asyncio.run(self._drop_stream())
        finally:
            self._stream_made = False
            if self._table_made:
                with connection.cursor() as cursor:
                    cursor.execute(f"DROP TABLE IF EXISTS {table_name(self.run_id)}")
                self._table_made = False
            if self.broker is not None:
                self.broker.stop()
                self.broker = None


if __name__ == "__main__":
    sys.exit(main())
