"""The invalidation bus: objects cached in every process (device and type profiles) and shared in
Redis, and how a change reaches all of them.

A change (admin, API, shell) calls `publish_invalidation(kind, schema, key)` after its
transaction commits: the shared Redis copy is dropped and every process listening on the
channel drops its own copy. Entries are named by (kind, schema, key); the Redis key of one is
`shared_key(...)`, which Django's cache prefixes with the database's identity (argus/cache.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Protocol

from django.core.cache import cache
from django.db import transaction
from django_redis import get_redis_connection

log = logging.getLogger(__name__)

INVALIDATION_CHANNEL = "argus:profile-invalidation"


def shared_key(kind: str, schema: str, key: str) -> str:
    """The Redis (Django cache) key of a shared entry."""
    return f"profile:{kind}:{schema}:{key}"


def publish_invalidation(kind: str, schema: str, key: str) -> None:
    """After the current transaction commits, drop an entry from Redis and tell every process."""

    def send() -> None:
        try:
            cache.delete(shared_key(kind, schema, key))
            get_redis_connection("default").publish(
                INVALIDATION_CHANNEL, json.dumps({"kind": kind, "schema": schema, "key": key})
            )
        except Exception:
            # The edit itself is committed; running processes pick it up when the TTL runs out.
            log.exception("profile invalidation failed kind=%s schema=%s key=%s", kind, schema, key)

    transaction.on_commit(send)


class Invalidatable(Protocol):
    """A cache that can drop one entry or everything."""

    def invalidate(self, kind: str, schema: str, key: str) -> None: ...

    def clear(self) -> None: ...


class InvalidationListener:
    """A daemon thread that applies invalidations published by other processes to a cache."""

    def __init__(self, cache: Invalidatable) -> None:
        self.cache = cache
        self._thread = threading.Thread(target=self._run, name="profile-invalidation", daemon=True)
        self._stop = threading.Event()
        self.ready = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failing_since = 0.0
        while not self._stop.is_set():
            try:
                pubsub = get_redis_connection("default").pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(INVALIDATION_CHANNEL)
                # Anything changed while we were not listening is unknown: start afresh.
                self.cache.clear()
                self.ready.set()
                if failing_since:
                    log.info("profile invalidation listener back after %.0f s", time.monotonic() - failing_since)
                    failing_since = 0.0
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    data = json.loads(message["data"])
                    self.cache.invalidate(data["kind"], data["schema"], data["key"])
            except Exception:
                # Once per outage, not once a second: cached profiles expire by their TTL meanwhile.
                if not failing_since:
                    failing_since = time.monotonic()
                    log.exception("profile invalidation listener lost Redis; retrying every second")
                self.ready.clear()
                time.sleep(1.0)


# Caches a module keeps for the whole process (e.g. the Celery tasks' profile cache), listened
# for in every worker process once it has started (argus/celery.py).
_process_caches: list[Invalidatable] = []
_process_listeners: list[InvalidationListener] = []


def register_process_cache(cache: Invalidatable) -> None:
    """Have invalidations applied to this cache in every worker process."""
    _process_caches.append(cache)


def start_process_listeners() -> None:
    """Start a listener for each registered cache (once per process)."""
    for registered in _process_caches[len(_process_listeners) :]:
        listener = InvalidationListener(registered)
        listener.start()
        _process_listeners.append(listener)
