"""Reads of telemetry's tables for the apps above it (assets' alerts and health, the read API),
so that no other app writes SQL against `telemetry_history`."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime

from django.db import connection

# device id -> metric -> (device time, value)
LatestReadings = dict[int, dict[str, tuple[datetime, float]]]


def latest_readings(device_metrics: Mapping[int, Collection[str]]) -> LatestReadings:
    """The newest reading (by device time) of each named metric of each device.

    One index probe per (device, metric) pair: the primary key (device_id, metric, time) read
    backwards in each daily partition, newest first, stopping at the first row. Scanning a
    device's rows instead (DISTINCT ON) reads every reading it sent in the window.
    """
    devices: list[int] = []
    metrics: list[str] = []
    for device_id, names in device_metrics.items():
        for name in names:
            devices.append(device_id)
            metrics.append(name)
    latest: LatestReadings = {}
    if not devices:
        return latest
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT p.device_id, p.metric, h.time, h.value
            FROM unnest(%s::bigint[], %s::text[]) AS p(device_id, metric)
            CROSS JOIN LATERAL (
                SELECT t.time, t.value FROM telemetry_history t
                WHERE t.device_id = p.device_id AND t.metric = p.metric
                ORDER BY t.time DESC LIMIT 1
            ) h
            """,
            [devices, metrics],
        )
        for device_id, metric, time, value in cursor.fetchall():
            latest.setdefault(device_id, {})[metric] = (time, value)
    return latest
