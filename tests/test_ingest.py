"""The ingest service's bookkeeping, called directly inside a tenant (rolled back afterwards)."""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise

import orjson
from django.test import override_settings
from django.utils import timezone

from devices.models import Device
from telemetry.ingest import ingest_batch
from telemetry.messages import BatchResult, IncomingMessage
from telemetry.models import TelemetryRaw
from telemetry.profiles import ProfileCache
from telemetry.storage import write_readings
from tests.conftest import TenantPersona, make_device, make_device_type


@override_settings(ARGUS_LAST_SEEN_RESOLUTION_SECONDS=30)
def test_it_spreads_last_seen_rewrites_over_the_resolution(in_alpha: TenantPersona) -> None:
    device_type = make_device_type()
    devices = [make_device(device_type) for _ in range(30)]
    ids = [d.pk for d in devices]
    start = timezone.now().replace(microsecond=0)
    rewrites_per_second = []
    rewritten_at: dict[int, list[int]] = {pk: [] for pk in ids}
    before = dict.fromkeys(ids)
    # Every device heard from every second for a minute, as a gateway's beacons are.
    for second in range(60):
        heard = start + timedelta(seconds=second)
        write_readings([], BatchResult(), dict.fromkeys(ids, heard))
        now = dict(Device.objects.filter(pk__in=ids).values_list("pk", "last_seen"))
        changed = [pk for pk in ids if now[pk] != before[pk]]
        for pk in changed:
            rewritten_at[pk].append(second)
        rewrites_per_second.append(len(changed))
        before = now
    assert rewrites_per_second[0] == 30  # never heard from before: all written at once
    # Then each at its own slot boundary: spread over the seconds, not all in one.
    assert max(rewrites_per_second[1:]) <= 3, rewrites_per_second
    for seconds in rewritten_at.values():
        between = [later - earlier for earlier, later in pairwise(seconds)]
        assert between and min(between) >= 15, rewritten_at  # never twice within half the resolution
        assert max([*between, 60 - seconds[-1]]) <= 45, rewritten_at  # never behind by more than 1.5 of it


def _delivery(logical_id: str, payload: bytes, key: str) -> IncomingMessage:
    # Each delivery gets its own stream id and receive time, as a redelivery after a restart does.
    return IncomingMessage(key=key, logical_id=logical_id, received_at=timezone.now(), payload=payload)


def test_it_stores_a_redelivered_message_without_msg_id_once_when_it_carries_its_time(
    in_alpha: TenantPersona,
) -> None:
    device = make_device(make_device_type())
    payload = orjson.dumps({"ts": int(timezone.now().timestamp() * 1000), "values": {"temperature": 21.5}})
    profiles = ProfileCache()
    first = ingest_batch(messages=[_delivery(device.logical_identifier, payload, "stream-1")], profiles=profiles)
    again = ingest_batch(messages=[_delivery(device.logical_identifier, payload, "stream-2")], profiles=profiles)
    assert (first.accepted, again.accepted, again.duplicates) == (1, 0, 1)
    assert TelemetryRaw.objects.filter(logical_identifier=device.logical_identifier).count() == 1
    # Other bytes (another time) are another message.
    later = orjson.dumps({"ts": int(timezone.now().timestamp() * 1000) + 1000, "values": {"temperature": 21.5}})
    assert ingest_batch(messages=[_delivery(device.logical_identifier, later, "stream-3")], profiles=profiles).accepted


def test_it_stores_each_message_without_a_time_of_its_own(in_alpha: TenantPersona) -> None:
    # Without `ts` a reading is stamped with its receive time: the same bytes twice are two
    # readings, so the delivery's stream id keeps them apart (send `msg_id` for exactly once).
    device = make_device(make_device_type())
    payload = orjson.dumps({"values": {"temperature": 21.5}})
    profiles = ProfileCache()
    for key in ("stream-1", "stream-2"):
        assert ingest_batch(messages=[_delivery(device.logical_identifier, payload, key)], profiles=profiles).accepted
    assert TelemetryRaw.objects.filter(logical_identifier=device.logical_identifier).count() == 2
