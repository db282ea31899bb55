"""Reads for the assets API: what an asset's devices last said, in the asset's own terms."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from assets.values import AssetReading, asset_readings, links_of, stored_readings


@dataclass
class AssetView:
    """What the API shows of an asset beyond its row: its devices' logical ids and its latest values."""

    devices: list[str] = field(default_factory=list)
    latest: dict[str, AssetReading] = field(default_factory=dict)
    device_names: dict[int, str] = field(default_factory=dict)


def asset_views(asset_ids: Collection[int]) -> dict[int, AssetView]:
    """For a page of assets, in two queries whatever its size: the links (with devices and types),
    then the newest stored reading of every metric they use; values transformed and mapped to
    the asset's metric names (assets/values.py)."""
    links = links_of(asset_ids=list(asset_ids))
    views = {asset_id: AssetView() for asset_id in asset_ids}
    latest = asset_readings(links, stored_readings(links))
    names: dict[int, str] = {link.device_id: link.device.logical_identifier for link in links}
    for link in links:
        views[link.asset_id].devices.append(link.device.logical_identifier)
    for asset_id, view in views.items():
        view.devices.sort()
        view.latest = latest.get(asset_id, {})
        view.device_names = names
    return views
