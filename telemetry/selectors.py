"""Reads of telemetry's tables for the apps above it (assets' alerts and health), so that no
other app writes SQL against `telemetry_history`."""

from __future__ import annotations

from datetime import datetime

from django.db import connection

from telemetry.messages import LatestValues


def latest_values_of_devices(device_ids: list[int]) -> LatestValues:
    """The newest value of every metric of each device, from telemetry_history."""
    latest: LatestValues = {}
    if not device_ids:
        return latest
    with connection.cursor() as cursor:
        # Per (device, metric) pair the primary key index finds the newest row directly.
        cursor.execute(
            """
            SELECT DISTINCT ON (device_id, metric) device_id, metric, value, time
            FROM telemetry_history WHERE device_id = ANY(%s)
              AND time > now() - interval '7 days'
            ORDER BY device_id, metric, time DESC
            """,
            [device_ids],
        )
        for device_id, metric, value, time in cursor.fetchall():
            newest, values = latest.get(device_id, (time, {}))
            values[metric] = value
            latest[device_id] = (max(newest, time), values)
    return latest


def metric_values_since(*, device_ids: list[int], metric: str, since: datetime) -> list[float]:
    """Every value of one metric of these devices from `since` on."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT value FROM telemetry_history WHERE device_id = ANY(%s) AND metric = %s AND time >= %s",
            [device_ids, metric, since],
        )
        return [row[0] for row in cursor.fetchall()]
