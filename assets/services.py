"""What assets do with stored telemetry: advance the threshold rules of the assets that the
readings feed, and the periodic safety net that does it again from what is stored."""

from __future__ import annotations

from assets.alerts import AlertChanges, alerts_evaluate
from assets.values import asset_readings, linked_devices, links_of, readings_of_batch, stored_readings
from telemetry.messages import LatestValues
from telemetry.selectors import LatestReadings


def telemetry_evaluate(*, latest: LatestValues) -> tuple[AlertChanges, set[int]]:
    """After a committed batch: the rules of every asset these devices feed, advanced by the
    batch's newest (transformed) values. Returns the changes and the assets that got values
    and have a health algorithm (their score is due)."""
    # The devices that feed an asset first: a reassembly's 2000 beacons mostly feed none, and
    # turning every one into per-metric readings was 10 % of a reassembly (chunk benchmark profile).
    linked = linked_devices(list(latest))
    if not linked:
        return AlertChanges(), set()
    return readings_evaluate(readings=readings_of_batch({device_id: latest[device_id] for device_id in linked}))


def readings_evaluate(*, readings: LatestReadings) -> tuple[AlertChanges, set[int]]:
    linked = linked_devices(list(readings))
    if not linked:
        return AlertChanges(), set()
    links = links_of(device_ids=linked)
    per_asset = asset_readings(links, readings)
    assets = {link.asset_id: link.asset for link in links}
    scored = {a for a in per_asset if assets[a].asset_type.health_algorithm != "none"}
    return alerts_evaluate(assets=assets, readings=per_asset), scored


def health_recompute(*, asset_ids: list[int] | None = None) -> tuple[AlertChanges, set[int]]:
    """The periodic safety net: rules advanced again by the stored newest values of every asset's
    devices, as a follow-up task lost after its batch committed (a Redis restart, a failed
    enqueue) would have done (readings not newer than a rule's state change nothing). Returns
    the changes and the assets to rescore (all of them)."""
    links = links_of(asset_ids=asset_ids)
    if not links:
        return AlertChanges(), set()
    per_asset = asset_readings(links, stored_readings(links))
    assets = {link.asset_id: link.asset for link in links}
    return alerts_evaluate(assets=assets, readings=per_asset), set(assets)
