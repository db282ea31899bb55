"""The ingest service's bookkeeping, called directly inside a tenant (rolled back afterwards)."""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise

from django.test import override_settings
from django.utils import timezone

from devices.models import Device
from telemetry.messages import BatchResult
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
