"""Per-device rate limit of the ingestion API, counted in Redis so every web worker shares it."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from django.conf import settings
from django_redis import get_redis_connection
from redis.exceptions import RedisError
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from argus.cache import database_identity
from devices.authentication import DeviceIdentity

log = logging.getLogger(__name__)

_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_rate(rate: str) -> tuple[int, int]:
    """`600/min` -> (600, 60): DRF's rate syntax (the period's first letter counts)."""
    count, _, period = rate.partition("/")
    return int(count), _PERIODS[period.strip()[:1].lower()]


class DeviceRateThrottle(BaseThrottle):
    """At most settings.ARGUS_HTTP_RATE_LIMIT requests per device and fixed window.

    One atomic INCR per request (DRF's SimpleRateThrottle keeps a list of timestamps and
    rewrites it with get/set, which races across workers). Keyed by the device's logical id,
    not the host or tenant a request came in on, so one device has one budget.
    """

    def __init__(self) -> None:
        self._wait: float | None = None

    def allow_request(self, request: Request, view: Any) -> bool:
        identity = request.user
        if not isinstance(identity, DeviceIdentity):
            return True
        limit, period = parse_rate(settings.ARGUS_HTTP_RATE_LIMIT)
        now = time.time()
        window = int(now // period)
        # The database's identity first, as in the cache keys (argus/cache.py): one Redis may serve
        # several databases, each with a device of this id, and each has its own budget.
        key = f"argus:ratelimit:{database_identity()}:device:{identity.logical_id}:{period}:{window}"
        try:
            pipe = get_redis_connection("default").pipeline(transaction=True)
            pipe.set(key, 0, ex=period + 1, nx=True)
            pipe.incr(key)
            count = int(pipe.execute()[1])
        except RedisError:
            # The limit protects the pipeline; it is not worth refusing data while Redis is away.
            log.warning("rate limit not applied to %s: Redis unavailable", identity.logical_id, exc_info=True)
            return True
        if count <= limit:
            return True
        self._wait = (window + 1) * period - now
        return False

    def wait(self) -> float | None:
        return math.ceil(self._wait) if self._wait is not None else None
