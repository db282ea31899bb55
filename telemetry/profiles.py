"""Device and device-type lookups for the hot path: in-process, then Redis, then PostgreSQL.

A change to a device or type (admin, API, shell) publishes an invalidation on the kernel's bus
(argus/invalidation.py) after its transaction commits; every running process drops its copy,
so an edit takes effect within moments without a restart. A TTL bounds staleness should an
invalidation ever be missed. Redis entries go through Django's cache, whose keys start with the
database's identity (argus/cache.py): another database on the same Redis, with the same schema
and ids, never reads them.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from django.core.cache import cache
from prometheus_client import Counter

from argus.invalidation import shared_key
from devices.models import Device, DeviceType
from devices.validation import MessageValidator

log = logging.getLogger(__name__)

LOCAL_TTL_SECONDS = 60.0
REDIS_TTL_SECONDS = 600
MISSING_TTL_SECONDS = 5.0

CACHE_LOOKUPS = Counter(
    "argus_profile_cache_lookups_total", "Profile lookups by kind and where they were answered", ["kind", "source"]
)

# Bound once: looking a labelled child up per message costs more than the increment.
LOCAL_DEVICE_HITS = CACHE_LOOKUPS.labels("device", "local")
LOCAL_TYPE_HITS = CACHE_LOOKUPS.labels("type", "local")
HITS_PER_INCREMENT = 256


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """What the pipeline needs to know about a device."""

    id: int
    logical_identifier: str
    device_type_id: int
    parent_device_id: int | None
    device_role: str
    status: str


@dataclass(frozen=True)
class TypeProfile:
    """What the pipeline needs to know about a device type, with its schema compiled."""

    id: int
    name: str
    processing_mode: str
    protocol_adapter: str
    message_schema: dict[str, Any]
    auto_register_children: bool
    child_device_type_id: int | None
    max_children: int
    chunk_ttl_seconds: int
    max_chunks: int
    # Rejections answered on devices/<id>/errors (a default: entries cached before it lack it).
    error_feedback: bool = False
    validator: Any = field(default=None, compare=False, repr=False)

    def with_validator(self) -> TypeProfile:
        """This profile with its JSON Schema compiled (validators are not stored in Redis)."""
        validator = MessageValidator(self.message_schema) if self.message_schema else None
        return TypeProfile(**{**_fields(self), "validator": validator})

    def schema_error(self, document: Any) -> str | None:
        """The first JSON Schema violation of a document, or None."""
        return self.validator.error(document) if self.validator is not None else None


def _fields(profile: TypeProfile) -> dict[str, Any]:
    values = {k: getattr(profile, k) for k in profile.__dataclass_fields__}
    values.pop("validator")
    return values


# Device columns in DeviceProfile's field order (its fields are named after them).
DEVICE_PROFILE_FIELDS = tuple(f.name for f in fields(DeviceProfile))


def device_profile_of(device: Device) -> DeviceProfile:
    """The profile of a device row."""
    return DeviceProfile(
        id=device.pk,
        logical_identifier=device.logical_identifier,
        device_type_id=device.device_type_id,
        parent_device_id=device.parent_device_id,
        device_role=device.device_role,
        status=device.status,
    )


def type_profile_of(device_type: DeviceType) -> TypeProfile:
    """The profile of a device type row."""
    return TypeProfile(
        id=device_type.pk,
        name=device_type.name,
        processing_mode=device_type.processing_mode,
        protocol_adapter=device_type.protocol_adapter,
        message_schema=device_type.message_schema or {},
        auto_register_children=device_type.auto_register_children,
        child_device_type_id=device_type.child_device_type_id,
        max_children=device_type.max_children,
        chunk_ttl_seconds=device_type.chunk_ttl_seconds,
        max_chunks=device_type.max_chunks,
        error_feedback=device_type.error_feedback,
    ).with_validator()


class ProfileCache:
    """Two-level cache of device and type profiles, per tenant schema. Not shared across threads
    for writes other than invalidation, which only removes entries."""

    def __init__(self) -> None:
        self._local: dict[tuple[str, str, str], tuple[float, Any]] = {}
        self._lock = threading.Lock()
        self._local_hits = {"device": 0, "type": 0}

    # -- lookups (call inside the tenant's schema_context) --

    def device(self, schema: str, logical_id: str) -> DeviceProfile | None:
        """The device with this logical identifier in the tenant, or None."""
        return self._get("device", schema, logical_id, lambda: self._load_device(logical_id))

    def device_type(self, schema: str, type_id: int) -> TypeProfile | None:
        """The device type with this id in the tenant, or None."""
        return self._get("type", schema, str(type_id), lambda: self._load_type(type_id))

    def devices(self, schema: str, logical_ids: list[str]) -> dict[str, DeviceProfile]:
        """Profiles of many devices (one query for those not cached)."""
        found: dict[str, DeviceProfile] = {}
        missing = []
        now = time.monotonic()
        for logical_id in logical_ids:
            entry = self._local.get(("device", schema, logical_id))
            if entry is not None and entry[0] > now:
                if entry[1] is not None:
                    found[logical_id] = entry[1]
            else:
                missing.append(logical_id)
        LOCAL_DEVICE_HITS.inc(len(logical_ids) - len(missing))
        if missing:
            CACHE_LOOKUPS.labels("device", "database").inc(len(missing))
            # Rows as tuples, not model instances: a gateway's 2000 children come back every TTL.
            rows = Device.objects.filter(logical_identifier__in=missing).values_list(*DEVICE_PROFILE_FIELDS)
            loaded = {p.logical_identifier: p for p in (DeviceProfile(*row) for row in rows)}
            for logical_id in missing:
                self._remember("device", schema, logical_id, loaded.get(logical_id))
            found.update(loaded)
        return found

    def prefetch_devices(self, schema: str, logical_ids: Iterable[str]) -> None:
        """Make a batch's coming `device()` lookups local: what this process does not hold fresh
        comes from Redis in one MGET, and what Redis lacks from PostgreSQL in one query.

        Looked up one by one, every device's entry expires once a local TTL and costs a Redis
        round trip in the middle of the batch: 6 % of runingest's profile at 5,000 msgs/s from
        1,000 devices (BENCHMARKS.md, "Where the time goes").
        """
        now = time.monotonic()
        local = self._local
        stale = {
            logical_id
            for logical_id in logical_ids
            if (entry := local.get(("device", schema, logical_id))) is None or entry[0] <= now
        }
        if not stale:
            return
        keys = {shared_key("device", schema, logical_id): logical_id for logical_id in stale}
        stored = cache.get_many(list(keys))
        CACHE_LOOKUPS.labels("device", "redis").inc(len(stored))
        for key, value in stored.items():
            self._remember("device", schema, keys[key], DeviceProfile(**value))
        rest = [logical_id for key, logical_id in keys.items() if key not in stored]
        if not rest:
            return
        CACHE_LOOKUPS.labels("device", "database").inc(len(rest))
        rows = Device.objects.filter(logical_identifier__in=rest).values_list(*DEVICE_PROFILE_FIELDS)
        loaded = {p.logical_identifier: p for p in (DeviceProfile(*row) for row in rows)}
        if loaded:
            cache.set_many(
                {shared_key("device", schema, p.logical_identifier): asdict(p) for p in loaded.values()},
                REDIS_TTL_SECONDS,
            )
        for logical_id in rest:
            self._remember("device", schema, logical_id, loaded.get(logical_id))

    def remember_device(self, schema: str, profile: DeviceProfile) -> None:
        """Store a profile just created by this process."""
        self._remember("device", schema, profile.logical_identifier, profile)

    # -- invalidation --

    def invalidate(self, kind: str, schema: str, key: str) -> None:
        """Forget one entry here (other processes hear about it through Redis)."""
        with self._lock:
            self._local.pop((kind, schema, key), None)

    def clear(self) -> None:
        """Forget everything held in this process."""
        with self._lock:
            self._local.clear()

    # -- internals --

    def _get(self, kind: str, schema: str, key: str, load: Callable[[], Any]) -> Any:
        now = time.monotonic()
        entry = self._local.get((kind, schema, key))
        if entry is not None and entry[0] > now:
            # Counted in batches: a Prometheus increment takes a lock, and two per message (device
            # and type) were 4 % of runingest's profile.
            self._local_hits[kind] += 1
            if self._local_hits[kind] >= HITS_PER_INCREMENT:
                (LOCAL_DEVICE_HITS if kind == "device" else LOCAL_TYPE_HITS).inc(self._local_hits[kind])
                self._local_hits[kind] = 0
            return entry[1]
        redis_key = shared_key(kind, schema, key)
        stored = cache.get(redis_key)
        if stored is not None:
            CACHE_LOOKUPS.labels(kind, "redis").inc()
            value = TypeProfile(**stored).with_validator() if kind == "type" else DeviceProfile(**stored)
        else:
            CACHE_LOOKUPS.labels(kind, "database").inc()
            value = load()
            if value is not None:
                cache.set(redis_key, _fields(value) if kind == "type" else asdict(value), REDIS_TTL_SECONDS)
        self._remember(kind, schema, key, value)
        return value

    def _remember(self, kind: str, schema: str, key: str, value: Any) -> None:
        # Spread expiry: a gateway's 2000 children are loaded at once, and reloading them all at
        # once every TTL, in every process, held the reassemblies up (a p99 spike of the chunk
        # benchmark once a minute).
        ttl = LOCAL_TTL_SECONDS * random.uniform(0.75, 1.0) if value is not None else MISSING_TTL_SECONDS  # noqa: S311
        with self._lock:
            self._local[(kind, schema, key)] = (time.monotonic() + ttl, value)

    @staticmethod
    def _load_device(logical_id: str) -> DeviceProfile | None:
        device = Device.objects.filter(logical_identifier=logical_id).first()
        return device_profile_of(device) if device else None

    @staticmethod
    def _load_type(type_id: int) -> TypeProfile | None:
        device_type = DeviceType.objects.filter(pk=type_id).first()
        return type_profile_of(device_type) if device_type else None
