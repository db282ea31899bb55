"""The JetStream → PostgreSQL consumer behind `manage.py runingest`.

`IngestConsumer.step()` pulls one batch, stores it (one transaction per tenant, in a dedicated
database thread so the event loop keeps the NATS connection alive), then acknowledges what was
committed. A message is acknowledged only after its commit; a batch that fails as a whole is
retried message by message so one poison message cannot block the others, and a message that
keeps failing is dead-lettered after `ARGUS_INGEST_MAX_DELIVER` deliveries.

A database outage is not a message's fault: the consumer keeps what it could not store, tells
JetStream it is still working on it (so it is neither redelivered nor counted toward the
delivery limit), waits with backoff and tries again until the database is back (argus/outage.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import django.db
import nats
import orjson
import psycopg
from django.conf import settings
from django.db import close_old_connections
from django_tenants.utils import schema_context
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge, Histogram

from argus.health import CheckResult, database_check, run_checks
from argus.logs import bound
from argus.models import Organization
from argus.outage import close_broken_connection, database_outage, is_database_error
from telemetry import jetstream as js_defs
from telemetry.health import connection_check, lag_verdict
from telemetry.ingest import ingest_batch, ingest_refused
from telemetry.messages import KIND_STATUS, KIND_TELEMETRY, BatchResult, Feedback, IncomingMessage
from telemetry.profiles import ProfileCache

log = logging.getLogger(__name__)

MESSAGES = Counter("argus_ingest_messages_total", "Messages handled by outcome", ["outcome"])
READINGS = Counter("argus_ingest_readings_total", "Readings written to telemetry_history")
BATCH_SIZE = Histogram(
    "argus_ingest_batch_messages", "Messages per fetched batch", buckets=(1, 10, 50, 100, 250, 500, 1000, 2000)
)
BATCH_SECONDS = Histogram("argus_ingest_batch_seconds", "Time to store one fetched batch")
LAG = Gauge("argus_ingest_pending_messages", "Messages waiting in the consumer (JetStream lag)")
ACK_PENDING = Gauge("argus_ingest_ack_pending_messages", "Messages delivered to consumers and not yet acknowledged")
REDELIVERIES = Counter(
    "argus_ingest_redeliveries_total", "JetStream messages received again (an earlier delivery was not acknowledged)"
)
FEEDBACK_SENT = Counter(
    "argus_ingest_feedback_total", "Rejections handed to the bridges to answer on devices/<id>/errors"
)
DEAD_LETTERS = Gauge("argus_deadletters", "Messages in the DEADLETTER stream (manage.py deadletters)")
E2E_LATENCY = Histogram(
    "argus_ingest_latency_seconds",
    "Receive time at the bridge/API to commit",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


# What PostgreSQL (or psycopg, before sending) refuses in a value: a NUL in text, a string over
# its column's length, a character with no UTF-8 form. Faults of the message, never of the
# infrastructure, so retrying cannot help.
DATABASE_REFUSALS = (psycopg.DataError, django.db.DataError, UnicodeEncodeError)


def _refusal_reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeEncodeError):
        return "a text value of the message has no UTF-8 form"
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"the database refused a value of the message: {detail}"


@dataclass(eq=False)  # identity: deliveries go in sets
class Delivery:
    """A fetched JetStream message: one device message, or an envelope of many, of one tenant."""

    msg: Msg
    schema: str
    messages: list[IncomingMessage]
    deliveries: int


@dataclass
class Stored:
    """What one attempt at storing a batch did with each delivery (on the database thread)."""

    results: dict[str, BatchResult] = field(default_factory=dict)
    committed: list[Delivery] = field(default_factory=list)
    failed: list[Delivery] = field(default_factory=list)
    unknown: list[Delivery] = field(default_factory=list)
    # Not stored because the database failed (an outage): kept and tried again, never counted.
    held: list[Delivery] = field(default_factory=list)
    error: BaseException | None = None


@dataclass
class StepOutcome:
    """What one step did (for logs and tests)."""

    fetched: int = 0
    acked: int = 0
    retried: int = 0
    dead_lettered: int = 0
    held: int = 0  # deliveries kept through a database outage (each counted once per retry)
    results: dict[str, BatchResult] = field(default_factory=dict)


class IngestConsumer:
    """Pulls telemetry from JetStream and stores it; `step()` does one batch."""

    def __init__(
        self,
        *,
        nats_url: str | None = None,
        batch_size: int | None = None,
        batch_wait: float | None = None,
        profiles: ProfileCache | None = None,
        after_commit: Callable[[str, BatchResult], None] | None = None,
    ) -> None:
        self.nats_url = nats_url or settings.NATS_URL
        self.batch_size = batch_size or settings.ARGUS_INGEST_BATCH
        self.batch_wait = batch_wait if batch_wait is not None else settings.ARGUS_INGEST_BATCH_WAIT_SECONDS
        self.max_deliver = settings.ARGUS_INGEST_MAX_DELIVER
        # While it waits out an outage, the consumer tells JetStream it is still working on the
        # messages it holds this often, well within the ack wait.
        self.progress_every = settings.ARGUS_INGEST_ACK_WAIT_SECONDS / 3
        self.database = database_outage()
        self.profiles = profiles or ProfileCache()
        self.after_commit = after_commit
        self._nc: NATS | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._js: JetStreamContext | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        # Django connections are per thread: all database work happens on this one.
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-db")
        self._known_schemas: dict[str, float] = {}
        self._prefetch: asyncio.Future[list[Msg]] | None = None
        self._closing = False
        self._per_delivery = 1.0
        self._totals: collections.Counter[str] = collections.Counter()
        self._last_summary = time.monotonic()
        self._last_lag_check = 0.0
        # The consumer's counts when last read (every few seconds, see _report_lag), for /readyz.
        self.pending: int | None = None
        self.ack_pending: int | None = None

    async def start(self) -> None:
        """Connect to NATS, declare the streams and bind to the durable consumer."""
        self._loop = asyncio.get_running_loop()
        self._nc = await nats.connect(
            js_defs.nats_servers(self.nats_url),
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            error_cb=_log_nats_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=_log_nats_event("reconnected"),
        )
        self._js = self._nc.jetstream()
        await js_defs.ensure_streams(self._js)
        self._sub = await self._js.pull_subscribe_bind(
            durable=js_defs.INGEST_CONSUMER,
            stream=js_defs.TELEMETRY_STREAM,
            pending_msgs_limit=2 * self.batch_size,
            pending_bytes_limit=64 * 1024 * 1024,
        )

    async def close(self) -> None:
        """Disconnect (after the batch in hand has been acknowledged)."""
        self._closing = True
        if self._prefetch is not None:
            # Fetched but not stored: hand them back now rather than after the ack wait.
            try:
                for msg in await self._prefetch:
                    await msg.nak()
            except (TimeoutError, nats.errors.TimeoutError, asyncio.CancelledError):
                pass
        if self._nc is not None:
            # Acks are plain publishes: flush them out before closing. (drain() would wait for
            # the pull subscription's open request to expire.)
            await self._nc.flush(timeout=5)
            await self._nc.close()
        self._db.shutdown(wait=True)

    def readiness(self) -> list[CheckResult]:
        """/readyz of runingest: PostgreSQL answers, NATS is connected, and the lag last read is
        under ARGUS_READY_MAX_LAG."""
        return run_checks([database_check, self._nats_check, self._lag_check])

    def _nats_check(self) -> CheckResult:
        return connection_check(self._nc, self._loop)

    def _lag_check(self) -> CheckResult:
        return lag_verdict(self.pending, self.ack_pending)

    async def step(self) -> bool:
        """Store and acknowledge one batch; False when there was nothing to do.

        The next batch is fetched while this one is stored, so neither NATS delivery nor the
        database waits for the other.
        """
        fetching = self._prefetch or asyncio.ensure_future(self._fetch())
        self._prefetch = None
        try:
            msgs = await fetching
        except (TimeoutError, nats.errors.TimeoutError):
            await self._report_lag()
            return False
        self._prefetch = asyncio.ensure_future(self._fetch())
        outcome = await self.handle(msgs)
        await self._report_lag()
        return outcome.fetched > 0

    async def _fetch(self) -> list[Msg]:
        assert self._sub is not None
        # Our own deadline too: some nats-server versions end a pull without its status.
        return await asyncio.wait_for(
            self._sub.fetch(self._fetch_count(), timeout=max(self.batch_wait, 0.05)), timeout=self.batch_wait + 2
        )

    def _fetch_count(self) -> int:
        """JetStream messages to ask for so that a batch holds about `batch_size` device messages:
        an envelope from the bridge carries hundreds, an HTTP message one."""
        return max(1, min(self.batch_size, round(self.batch_size / self._per_delivery)))

    async def handle(self, msgs: list[Msg]) -> StepOutcome:
        """Store a fetched batch and settle every message in it (ack, nak or dead-letter)."""
        started = time.perf_counter()
        outcome = StepOutcome(fetched=len(msgs))
        BATCH_SIZE.observe(len(msgs))
        by_schema: dict[str, list[Delivery]] = defaultdict(list)
        for msg in msgs:
            delivery, problem = self._open(msg)
            if delivery is None:
                await self._dead_letter(msg, "malformed_envelope", problem)
                outcome.dead_lettered += 1
            elif delivery.deliveries > self.max_deliver:
                await self._dead_letter(msg, "max_deliveries", f"failed {self.max_deliver} deliveries")
                outcome.dead_lettered += 1
            else:
                by_schema[delivery.schema].append(delivery)
                # Moving average of device messages per JetStream message, for the next fetch.
                self._per_delivery = 0.9 * self._per_delivery + 0.1 * len(delivery.messages)

        loop = asyncio.get_running_loop()
        while by_schema:
            stored = await loop.run_in_executor(self._db, self._store, dict(by_schema))
            await self._settle(stored, outcome)
            if stored.error is None:
                self.database.recovered()
                break
            # The database failed: keep what was not stored, wait, and try again.
            outcome.held += len(stored.held)
            by_schema = defaultdict(list)
            for delivery in stored.held:
                by_schema[delivery.schema].append(delivery)
            await self._wait_out(self.database.failed(stored.error), stored.held)
        self._totals.update(batches=1, dead_lettered=outcome.dead_lettered, retried=outcome.retried)
        MESSAGES.labels("dead_lettered").inc(outcome.dead_lettered)
        MESSAGES.labels("retried").inc(outcome.retried)
        BATCH_SECONDS.observe(time.perf_counter() - started)
        return outcome

    async def _settle(self, stored: Stored, outcome: StepOutcome) -> None:
        """Ack what was committed, nak what failed on its own, dead-letter unknown tenants; what
        the database outage held back stays unsettled."""
        for delivery in stored.unknown:
            await self._dead_letter(delivery.msg, "unknown_tenant", f"no tenant schema {delivery.schema!r}")
            outcome.dead_lettered += 1
        for delivery in stored.committed:
            await delivery.msg.ack()
        outcome.acked += len(stored.committed)
        for result in stored.results.values():
            await self._send_feedback(result.feedback)
        for delivery in stored.failed:
            # Back off so a transient fault is not hammered. What of an envelope was stored
            # already is absorbed as duplicates on redelivery.
            await delivery.msg.nak(delay=min(2.0**delivery.deliveries, 30.0))
        outcome.retried += len(stored.failed)
        now = time.time()
        for delivery in stored.committed:
            for message in delivery.messages:
                E2E_LATENCY.observe(max(0.0, now - message.received_at.timestamp()))
        for schema, result in stored.results.items():
            outcome.results[schema] = result
            self._totals.update(
                accepted=result.accepted,
                rejected=result.rejected,
                duplicates=result.duplicates,
                chunks=result.chunks,
                readings=result.readings,
            )
            MESSAGES.labels("accepted").inc(result.accepted)
            MESSAGES.labels("rejected").inc(result.rejected)
            MESSAGES.labels("duplicate").inc(result.duplicates)
            READINGS.inc(result.readings)
            if self.after_commit is not None:
                # On the database thread: the follow-up hooks may read the database (assets asks
                # which of these devices feed an asset) and Django connections are per thread.
                await asyncio.get_running_loop().run_in_executor(self._db, self._after_commit, schema, result)

    async def _send_feedback(self, feedback: list[Feedback]) -> None:
        """Hand the committed rejections of devices that asked for feedback to the bridges, which
        answer them on devices/<id>/errors (rate-limited per device there). Core NATS, fire and
        forget: the rejection is stored; its answer to the device is a courtesy."""
        if not feedback or self._nc is None or not self._nc.is_connected:
            return
        for item in feedback:
            body = {
                "device": item.logical_id,
                "msg_id": item.msg_id,
                "reason": item.reason,
                "received_at": item.received_at.isoformat(),
            }
            await self._nc.publish(js_defs.FEEDBACK_SUBJECT, orjson.dumps(body))
        FEEDBACK_SENT.inc(len(feedback))

    def _after_commit(self, schema: str, result: BatchResult) -> None:
        assert self.after_commit is not None
        try:
            self.after_commit(schema, result)
        except Exception as exc:
            if not is_database_error(exc):
                raise
            # What was stored stays stored (and acknowledged); only its follow-ups are skipped.
            log.warning(
                "follow-ups skipped, database unavailable schema=%s accepted=%d: %s", schema, result.accepted, exc
            )
            close_broken_connection()

    async def _wait_out(self, delay: float, held: list[Delivery]) -> None:
        """Wait `delay` seconds before the next try, keeping JetStream from redelivering what we
        hold: `in_progress` resets a message's ack timer without counting a delivery. The next
        batch, fetched in advance, is held as well."""
        deadline = time.monotonic() + delay
        while True:
            msgs = [d.msg for d in held]
            if self._prefetch is not None and self._prefetch.done() and not self._prefetch.cancelled():
                if self._prefetch.exception() is None:
                    msgs += self._prefetch.result()
            for msg in msgs:
                await msg.in_progress()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, self.progress_every))

    # -- database thread --

    def _store(self, by_schema: dict[str, list[Delivery]]) -> Stored:
        """Store each tenant's messages in its own transaction (runs on the database thread).

        On a database error, what is left is held (`Stored.held`) rather than failed."""
        close_old_connections()
        stored = Stored()
        for schema, deliveries in by_schema.items():
            if stored.error is not None:
                stored.held.extend(deliveries)
                continue
            try:
                exists = self._schema_exists(schema)
            except Exception as exc:
                if not is_database_error(exc):
                    raise
                self._lost_database(stored, exc)
                stored.held.extend(deliveries)
                continue
            if not exists:
                stored.unknown.extend(deliveries)
                continue
            with schema_context(schema), bound(tenant=schema):
                self._store_schema(schema, deliveries, stored)
        return stored

    def _store_schema(self, schema: str, deliveries: list[Delivery], stored: Stored) -> None:
        messages = [m for d in deliveries for m in d.messages]
        try:
            stored.results[schema] = ingest_batch(messages=messages, profiles=self.profiles)
            stored.committed.extend(deliveries)
            return
        except Exception as exc:
            if is_database_error(exc):
                self._lost_database(stored, exc)
                stored.held.extend(deliveries)
                return
            log.exception("batch failed schema=%s messages=%d; retrying one by one", schema, len(messages))
            close_old_connections()
        total = BatchResult()
        for index, delivery in enumerate(deliveries):
            ok = True
            for message in delivery.messages:
                try:
                    total.merge(ingest_batch(messages=[message], profiles=self.profiles))
                except DATABASE_REFUSALS as exc:
                    # The message's own fault (a value the adapters let through and the
                    # database refuses): a rejected raw row, not a redelivery loop.
                    log.warning(
                        "message refused by the database schema=%s device=%s key=%s: %r",
                        schema,
                        message.logical_id,
                        message.key,
                        exc,
                    )
                    total.merge(ingest_refused(message=message, reason=_refusal_reason(exc), profiles=self.profiles))
                except Exception as exc:
                    if is_database_error(exc):
                        # Not this message's fault: hold it and the rest (what of this envelope
                        # was stored is absorbed as duplicates when it is stored again).
                        self._lost_database(stored, exc)
                        stored.held.extend(deliveries[index:])
                        stored.results[schema] = total
                        return
                    log.exception(
                        "message failed schema=%s device=%s key=%s delivery=%d",
                        schema,
                        message.logical_id,
                        message.key,
                        delivery.deliveries,
                    )
                    close_old_connections()
                    ok = False
            (stored.committed if ok else stored.failed).append(delivery)
        stored.results[schema] = total

    @staticmethod
    def _lost_database(stored: Stored, exc: BaseException) -> None:
        stored.error = exc
        close_broken_connection()

    def _schema_exists(self, schema: str) -> bool:
        checked = self._known_schemas.get(schema)
        if checked is not None and checked > time.monotonic():
            return True
        if Organization.objects.filter(schema_name=schema).exists():
            self._known_schemas[schema] = time.monotonic() + 60
            return True
        return False

    # -- helpers --

    def _open(self, msg: Msg) -> tuple[Delivery | None, str]:
        parts = msg.subject.split(".")
        headers = msg.headers or {}
        if len(parts) != 3 or parts[0] != "telemetry":
            return None, f"unexpected subject {msg.subject!r}"
        deliveries = msg.metadata.num_delivered
        if deliveries > 1:
            REDELIVERIES.inc()
        if js_defs.H_ENVELOPE in headers:
            try:
                records = js_defs.decode_envelope(msg.data)
            except (ValueError, UnicodeDecodeError) as exc:
                return None, f"bad envelope: {exc}"
            refusal = headers.get(js_defs.H_REASON, "")
            # telemetry.<schema>.status: the devices' presence messages (telemetry/presence.py).
            kind = KIND_STATUS if parts[2] == "status" else KIND_TELEMETRY
            retained = headers.get(js_defs.H_RETAINED) == "1"
            messages = [
                IncomingMessage(
                    key=r.key,
                    logical_id=r.logical_id,
                    received_at=js_defs.from_epoch_us(r.received_us),
                    payload=r.payload,
                    # An envelope of messages the bridge refused (all for the same reason).
                    refusal=refusal,
                    kind=kind,
                    retained=retained,
                )
                for r in records
            ]
            return Delivery(msg=msg, schema=parts[1], messages=messages, deliveries=deliveries), ""
        try:
            received_ms = float(headers[js_defs.H_RECEIVED])
            logical_id = headers[js_defs.H_DEVICE]
            key = headers[js_defs.H_MSG_ID]
        except (KeyError, ValueError) as exc:
            return None, f"missing or bad header: {exc}"
        message = IncomingMessage(
            key=key,
            logical_id=logical_id,
            received_at=js_defs.from_epoch_ms(received_ms),
            payload=msg.data,
            transport=headers.get(js_defs.H_TRANSPORT, "mqtt"),
            refusal=headers.get(js_defs.H_REASON, ""),
        )
        return Delivery(msg=msg, schema=parts[1], messages=[message], deliveries=deliveries), ""

    async def _dead_letter(self, msg: Msg, code: str, reason: str) -> None:
        assert self._js is not None
        headers = dict(msg.headers or {})
        headers.pop(js_defs.H_MSG_ID, None)
        headers[js_defs.H_REASON] = reason[:500]
        headers["Argus-Original-Subject"] = msg.subject
        await self._js.publish(js_defs.deadletter_subject(code), msg.data, headers=headers)
        await msg.ack()
        log.warning("dead-lettered code=%s subject=%s reason=%s", code, msg.subject, reason)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("nats disconnected")

    async def _report_lag(self) -> None:
        if self._sub is None or time.monotonic() - self._last_lag_check < 5:
            return
        self._last_lag_check = time.monotonic()
        try:
            info = await self._sub.consumer_info()
            self.pending, self.ack_pending = info.num_pending or 0, info.num_ack_pending or 0
            LAG.set(self.pending)
            ACK_PENDING.set(self.ack_pending)
            assert self._js is not None
            DEAD_LETTERS.set((await self._js.stream_info(js_defs.DEADLETTER_STREAM)).state.messages)
        except Exception:
            log.exception("could not read consumer info")
            return
        if time.monotonic() - self._last_summary >= 30 and self._totals:
            # One line per half minute with what was done since the last one.
            self._last_summary = time.monotonic()
            counts = " ".join(f"{k}={v}" for k, v in sorted(self._totals.items()))
            log.info("ingest progress %s pending=%s", counts, info.num_pending)
            self._totals.clear()


async def _log_nats_error(exc: Exception) -> None:
    log.warning("nats error: %s", exc)


def _log_nats_event(event: str) -> Callable[[], asyncio.Future[None]]:
    async def callback() -> None:
        log.warning("nats %s", event)

    return callback  # type: ignore[return-value]
