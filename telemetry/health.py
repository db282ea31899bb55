"""Readiness checks of the pipeline's JetStream side (see argus/health.py): the TELEMETRY stream
and the ingest consumer's durable exist, the consumer's lag is under ARGUS_READY_MAX_LAG, and a
worker's own NATS connection answers.

The web's checks open a NATS connection of their own, without reconnects, bounded by the check
timeout: they ask "can a new client get through now". runbridge and runingest ask their own
connection for a round trip instead (`connection_check`): nats-py calls a connection to a frozen
server connected until its pings have gone unanswered for minutes.
"""

from __future__ import annotations

import asyncio
import logging
import math

import nats
import nats.errors
import nats.js.errors
from django.conf import settings
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerInfo

from argus.health import CheckResult, check_timeout
from telemetry import jetstream as js_defs

log = logging.getLogger(__name__)


class JetStreamUnready(Exception):
    """NATS cannot be reached, or the stream or the durable consumer is missing."""


async def _quiet(exc: Exception) -> None:
    log.debug("readiness: nats error: %r", exc)


async def _consumer_info(url: str, timeout: float) -> ConsumerInfo:
    nc = await nats.connect(
        js_defs.nats_servers(url),
        connect_timeout=max(1, round(timeout)),
        allow_reconnect=False,
        max_reconnect_attempts=0,
        error_cb=_quiet,
    )
    try:
        jsm = nc.jsm()
        try:
            await jsm.stream_info(js_defs.TELEMETRY_STREAM)
        except nats.js.errors.NotFoundError:
            raise JetStreamUnready(f"stream {js_defs.TELEMETRY_STREAM} does not exist") from None
        try:
            return await jsm.consumer_info(js_defs.TELEMETRY_STREAM, js_defs.INGEST_CONSUMER)
        except nats.js.errors.NotFoundError:
            raise JetStreamUnready(
                f"consumer {js_defs.INGEST_CONSUMER} of stream {js_defs.TELEMETRY_STREAM} does not exist"
            ) from None
    finally:
        await nc.close()


def consumer_info(url: str | None = None) -> ConsumerInfo:
    """The ingest consumer's info; JetStreamUnready when NATS, the stream or the durable is not there."""
    timeout = check_timeout()
    try:
        return asyncio.run(asyncio.wait_for(_consumer_info(url or settings.NATS_URL, timeout), timeout))
    except JetStreamUnready:
        raise
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise JetStreamUnready(f"unreachable: {type(exc).__name__} {exc}".strip()) from exc


def jetstream_check() -> CheckResult:
    """NATS answers, and the TELEMETRY stream and the ingest durable exist."""
    try:
        consumer_info()
    except JetStreamUnready as exc:
        log.warning("readiness: jetstream: %s", exc)
        return CheckResult("jetstream", False, str(exc))
    return CheckResult("jetstream", True)


def lag_verdict(pending: int | None, ack_pending: int | None = None) -> CheckResult:
    """The lag check's verdict on a consumer's counts (None: not known yet)."""
    if pending is None:
        return CheckResult("lag", None, "not read yet")
    bound = settings.ARGUS_READY_MAX_LAG
    detail = f"{pending} pending" + (f", {ack_pending} awaiting ack" if ack_pending is not None else "")
    if pending > bound:
        return CheckResult("lag", False, f"{detail}: over the bound of {bound} (ARGUS_READY_MAX_LAG)")
    return CheckResult("lag", True, detail)


def lag_check() -> CheckResult:
    """The ingest consumer has at most ARGUS_READY_MAX_LAG messages not yet delivered."""
    try:
        info = consumer_info()
    except JetStreamUnready as exc:
        return CheckResult("lag", False, f"cannot read the consumer: {exc}")
    return lag_verdict(info.num_pending or 0, info.num_ack_pending)


def connection_check(nc: NATS | None, loop: asyncio.AbstractEventLoop | None) -> CheckResult:
    """A worker's own NATS connection answers a PING within the check timeout. Called from another
    thread than the one running `loop`, the event loop that owns the connection."""
    if nc is None or loop is None:
        return CheckResult("nats", False, "not connected yet")
    if not nc.is_connected:
        return CheckResult("nats", False, "not connected (reconnecting)")
    # Inside the check's deadline, so the answer says why rather than "no answer".
    timeout = 0.9 * check_timeout()
    future = asyncio.run_coroutine_threadsafe(nc.flush(timeout=max(1, math.floor(timeout))), loop)
    try:
        future.result(timeout)
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        future.cancel()
        return CheckResult("nats", False, f"no answer to a ping within {timeout:.1f} s ({type(exc).__name__})")
    return CheckResult("nats", True)
