"""Dead letters: what no tenant could take, kept in the JetStream stream DEADLETTER, listed and
replayed.

Two kinds end there. The bridge dead-letters a message whose device is unknown on the platform
(`deadletter.unknown_device`: the exact MQTT bytes, the device id in `Argus-Device`). runingest
dead-letters a stream message it could not handle within its deliveries, or could not open
(the message as it was, with `Argus-Original-Subject`). Replaying one publishes it again where
it belongs — to its original subject, or, for an unknown device that has been registered since,
to that device's tenant — and then deletes it from DEADLETTER. Storing is idempotent (a message's
`msg_id`, its exact bytes when it carries its own time, an envelope's record ids), so a replay
that is interrupted and run again stores nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client import Counter

from argus.registry import registry_route
from telemetry import jetstream as js_defs

log = logging.getLogger(__name__)
T = TypeVar("T")

H_ORIGINAL_SUBJECT = "Argus-Original-Subject"
H_TOPIC = "Argus-Topic"

REPLAYED = Counter("argus_deadletters_replayed_total", "Dead letters published again", ["reason"])


@dataclass(frozen=True)
class DeadLetter:
    """One message of the DEADLETTER stream."""

    sequence: int
    reason_code: str
    reason: str
    device: str
    topic: str
    original_subject: str
    received_at: datetime
    payload: bytes
    headers: dict[str, str]

    @property
    def size(self) -> int:
        return len(self.payload)

    def preview(self, limit: int = 120) -> str:
        """The start of the payload as text (undecodable bytes escaped)."""
        text = self.payload[:limit].decode("utf-8", "backslashreplace")
        return text + ("…" if len(self.payload) > limit else "")


@dataclass(frozen=True)
class ReplayOutcome:
    """What a replay did with one dead letter."""

    dead_letter: DeadLetter
    replayed: bool
    detail: str


def deadletters_list(
    *, reason: str | None = None, since: datetime | None = None, limit: int = 100, nats_url: str | None = None
) -> list[DeadLetter]:
    """Dead letters, oldest first (of one reason code, from a time on), at most `limit`."""
    return asyncio.run(_with_js(nats_url, lambda js: _read(js, reason, since, limit)))


def deadletters_replay(
    *,
    reason: str | None = None,
    since: datetime | None = None,
    limit: int = 10_000,
    dry_run: bool = False,
    nats_url: str | None = None,
) -> list[ReplayOutcome]:
    """Publish dead letters again where they belong and delete those published (see the module)."""
    letters = deadletters_list(reason=reason, since=since, limit=limit, nats_url=nats_url)
    # Routes from the registry, here on the caller's thread (Django connections are per thread).
    plans = [(letter, *_destination(letter)) for letter in letters]

    async def replay(js: JetStreamContext) -> list[ReplayOutcome]:
        outcomes = []
        for letter, subject, detail in plans:
            if subject is None or dry_run:
                outcomes.append(ReplayOutcome(letter, False, detail if subject is None else f"would go to {subject}"))
                continue
            headers = {k: v for k, v in letter.headers.items() if k not in (js_defs.H_REASON, H_ORIGINAL_SUBJECT)}
            # The same id however often this dead letter is replayed: JetStream keeps one copy.
            headers[js_defs.H_MSG_ID] = f"deadletter-{letter.sequence}"
            await js.publish(subject, letter.payload, headers=headers)
            await js.delete_msg(js_defs.DEADLETTER_STREAM, letter.sequence)
            REPLAYED.labels(letter.reason_code).inc()
            log.info("dead letter %d replayed to %s", letter.sequence, subject)
            outcomes.append(ReplayOutcome(letter, True, f"replayed to {subject}"))
        return outcomes

    return asyncio.run(_with_js(nats_url, replay))


def deadletters_count(*, nats_url: str | None = None) -> int:
    """How many dead letters the stream holds."""

    async def count(js: JetStreamContext) -> int:
        return int((await js.stream_info(js_defs.DEADLETTER_STREAM)).state.messages)

    return asyncio.run(_with_js(nats_url, count))


def _destination(letter: DeadLetter) -> tuple[str | None, str]:
    """Where a dead letter goes now, or None and why it cannot go yet."""
    if letter.original_subject:
        return letter.original_subject, ""
    if not letter.device:
        return None, "no device to route it to"
    route = registry_route(letter.device)
    if route is None:
        return None, f"device {letter.device!r} is still unknown"
    schema, device_id = route
    return js_defs.telemetry_subject(schema, device_id), ""


async def _with_js(nats_url: str | None, work: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    nc: NATS = await nats.connect(js_defs.nats_servers(nats_url), connect_timeout=5, max_reconnect_attempts=2)
    try:
        js = nc.jetstream()
        await js_defs.ensure_streams(js)
        return await work(js)
    finally:
        await nc.close()


async def _read(js: JetStreamContext, reason: str | None, since: datetime | None, limit: int) -> list[DeadLetter]:
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.BY_START_TIME if since else DeliverPolicy.ALL,
        opt_start_time=since,
        inactive_threshold=30.0,
    )
    subject = js_defs.deadletter_subject(reason) if reason else "deadletter.>"
    try:
        info = await js.stream_info(js_defs.DEADLETTER_STREAM)
    except NotFoundError:
        return []
    if not info.state.messages:
        return []
    subscription = await js.pull_subscribe(subject, stream=js_defs.DEADLETTER_STREAM, config=config)
    letters: list[DeadLetter] = []
    try:
        while len(letters) < limit:
            try:
                batch = await subscription.fetch(min(256, limit - len(letters)), timeout=1.0)
            except nats.errors.TimeoutError:
                break
            letters.extend(_letter(msg) for msg in batch)
            if batch and batch[-1].metadata.num_pending == 0:
                break
    finally:
        await subscription.unsubscribe()
    return letters


def _letter(msg: nats.aio.msg.Msg) -> DeadLetter:
    headers = dict(msg.headers or {})
    received_ms = headers.get(js_defs.H_RECEIVED)
    received_at = (
        js_defs.from_epoch_ms(float(received_ms)) if received_ms else msg.metadata.timestamp.replace(microsecond=0)
    )
    return DeadLetter(
        sequence=msg.metadata.sequence.stream,
        reason_code=msg.subject.removeprefix("deadletter."),
        reason=headers.get(js_defs.H_REASON, ""),
        device=headers.get(js_defs.H_DEVICE, ""),
        topic=headers.get(H_TOPIC, ""),
        original_subject=headers.get(H_ORIGINAL_SUBJECT, ""),
        received_at=received_at,
        payload=msg.data,
        headers=headers,
    )


def reason_codes(letters: list[DeadLetter]) -> Iterator[tuple[str, int]]:
    """(reason code, how many) of these dead letters, most frequent first."""
    counts: dict[str, int] = {}
    for letter in letters:
        counts[letter.reason_code] = counts.get(letter.reason_code, 0) + 1
    yield from sorted(counts.items(), key=lambda item: -item[1])
