"""Live updates for open pages: what changed in a tenant, published on Redis pub/sub, coalesced.

Any process may note a change (runingest after a committed batch: counts and the devices'
newest values; Celery after an alert or a health score changed). Notes accumulate in memory
per tenant; a background thread publishes one event per tenant with something pending every
ARGUS_LIVE_INTERVAL_SECONDS, on channel `argus:live:<database>:<schema>`. So a tenant gets at most one
event per interval per process, however fast its devices send, and an event never holds more
than ARGUS_LIVE_MAX_ITEMS entries per section (the newest win). Live updates are a view, not a
record: an event lost with a restarting process or Redis costs an open page one refresh of
what the next event brings.

An event (JSON):
    {"time": <unix s>, "interval": <s since this process's previous event for the tenant>,
     "counts": {"messages": n, "readings": n},
     "devices": {"<device id>": {"time": ISO, "values": {metric: value}}},
     "alerts": {"<alert id>": {...}}, "health": {"<asset id>": {...}}}
Sections without news are left out.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
from django.conf import settings
from redis.exceptions import RedisError

from argus.cache import database_identity

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "argus:live:"


def channel(schema: str) -> str:
    """The pub/sub channel of a tenant's live events: `argus:live:<database>:<schema>`. One Redis
    may serve several databases (argus/cache.py), each with its own tenant of this name: a page
    hears only its own database's tenant."""
    return f"{CHANNEL_PREFIX}{database_identity()}:{schema}"


@dataclass
class _Pending:
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sections: dict[str, dict[str, Any]] = field(default_factory=lambda: defaultdict(dict))


class Coalescer:
    """The notes of one process, per tenant, and the thread that publishes them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._last: dict[str, float] = {}
        self._pid = 0
        self._thread: threading.Thread | None = None
        self.published = 0

    def count(self, schema: str, **counts: int) -> None:
        """Add to the tenant's counters (messages, readings)."""
        with self._lock:
            pending = self._pending_of(schema)
            for name, n in counts.items():
                pending.counts[name] += n

    def update(self, schema: str, section: str, items: dict[str, Any]) -> None:
        """Set entries of a section (devices, alerts, health): a newer note of a key replaces the
        older one; beyond ARGUS_LIVE_MAX_ITEMS, the oldest keys give way."""
        most = settings.ARGUS_LIVE_MAX_ITEMS
        with self._lock:
            entries = self._pending_of(schema).sections[section]
            for key, value in items.items():
                entries.pop(key, None)  # re-inserted last: the newest stay
                entries[key] = value
            while len(entries) > most:
                del entries[next(iter(entries))]

    def _pending_of(self, schema: str) -> _Pending:
        self._ensure_thread()
        pending = self._pending.get(schema)
        if pending is None:
            pending = self._pending[schema] = _Pending()
        return pending

    def _ensure_thread(self) -> None:
        # A forked child (a Celery worker process) inherits the dict but not the thread.
        if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
            if self._pid != os.getpid():
                self._pending, self._last, self._pid = {}, {}, os.getpid()
            self._thread = threading.Thread(target=self._run, name="argus-live", daemon=True)
            self._thread.start()

    def take(self) -> dict[str, dict[str, Any]]:
        """The events to publish now, one per tenant with news; the pending notes are cleared."""
        now = time.time()
        with self._lock:
            pending, self._pending = self._pending, {}
        events = {}
        for schema, p in pending.items():
            event: dict[str, Any] = {"time": round(now, 3), "interval": round(now - self._last.get(schema, now), 3)}
            if p.counts:
                event["counts"] = dict(p.counts)
            event.update({name: entries for name, entries in p.sections.items() if entries})
            self._last[schema] = now
            events[schema] = event
        return events

    def flush(self) -> int:
        """Publish what is pending; the number of events sent."""
        events = self.take()
        if not events:
            return 0
        from django_redis import get_redis_connection

        try:
            pipe = get_redis_connection("default").pipeline(transaction=False)
            for name, event in events.items():
                pipe.publish(name, orjson.dumps(event))
            pipe.execute()
        except RedisError:
            # A view, not a record: the next event carries what changes next.
            log.warning("live events not published (%d tenants)", len(events), exc_info=True)
            return 0
        self.published += len(events)
        return len(events)

    def _run(self) -> None:
        while True:
            time.sleep(settings.ARGUS_LIVE_INTERVAL_SECONDS)
            try:
                self.flush()
            except Exception:
                log.exception("live publisher failed; continuing")


coalescer = Coalescer()


def note_counts(schema: str, **counts: int) -> None:
    """Count messages/readings stored for a tenant (no-op when live updates are off)."""
    if settings.ARGUS_LIVE_INTERVAL_SECONDS > 0:
        coalescer.count(channel(schema), **counts)


def note(schema: str, section: str, items: dict[str, Any]) -> None:
    """Note changed entries of a section for a tenant (no-op when live updates are off)."""
    if settings.ARGUS_LIVE_INTERVAL_SECONDS > 0 and items:
        coalescer.update(channel(schema), section, items)
