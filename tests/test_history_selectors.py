"""telemetry.selectors.latest_readings against the real partitioned table: the probe bounded by
the device's last_seen must give what an unbounded probe gives, whatever last_seen says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.db import connection

from argus.sql import text_array
from devices.models import Device
from telemetry.selectors import LATEST_WINDOW, LatestReadings, Point, history_buckets, history_points, latest_readings
from tests.conftest import TenantPersona, make_device, make_device_type

NOW = datetime.now(UTC).replace(microsecond=0)


def insert(device_id: int, metric: str, *readings: tuple[datetime, float]) -> None:
    with connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO telemetry_history (time, device_id, metric, value, raw_id) VALUES (%s, %s, %s, %s, 0)",
            [(time, device_id, metric, value) for time, value in readings],
        )


def unbounded(device_metrics: dict[int, set[str]]) -> LatestReadings:
    """The newest reading of each pair, the plain way (one query per pair)."""
    latest: LatestReadings = {}
    with connection.cursor() as cursor:
        for device_id, names in device_metrics.items():
            for name in names:
                cursor.execute(
                    "SELECT time, value FROM telemetry_history WHERE device_id = %s AND metric = %s "
                    "ORDER BY time DESC LIMIT 1",
                    [device_id, name],
                )
                row = cursor.fetchone()
                if row:
                    latest.setdefault(device_id, {})[name] = (row[0], row[1])
    return latest


def test_latest_readings_is_the_newest_by_device_time_whatever_last_seen_says(in_alpha: TenantPersona) -> None:
    device_type = make_device_type()
    current, never_seen, clock_behind, seen_later = (make_device(device_type) for _ in range(4))
    Device.objects.filter(pk__in=[current.pk, clock_behind.pk]).update(last_seen=NOW)
    Device.objects.filter(pk=seen_later.pk).update(last_seen=NOW + timedelta(days=3))

    # In the window: the newest of three, one of them in yesterday's partition.
    insert(current.pk, "temperature", (NOW - timedelta(minutes=10), 21.5), (NOW - timedelta(days=1), 19.0))
    # A metric no longer sent: only old readings (the DEFAULT partition, before every daily one).
    insert(current.pk, "humidity", (NOW - timedelta(days=40), 55.0), (NOW - timedelta(days=41), 54.0))
    # A clock far ahead: the newest by device time lands in the DEFAULT partition, after the daily ones.
    insert(current.pk, "battery", (NOW - timedelta(minutes=1), 90.0), (NOW + timedelta(days=60), 89.0))
    insert(never_seen.pk, "temperature", (NOW - timedelta(hours=3), 18.0), (NOW - timedelta(hours=4), 17.0))
    insert(clock_behind.pk, "temperature", (NOW - LATEST_WINDOW - timedelta(hours=5), 16.0))
    insert(seen_later.pk, "temperature", (NOW, 15.0), (NOW - timedelta(minutes=1), 14.0))
    # Names that an array literal must quote.
    odd = ["a,b", 'say "hi"', "back\\slash", "NULL", "{x}"]
    for i, name in enumerate(odd):
        insert(current.pk, name, (NOW - timedelta(minutes=i), float(i)))

    asked = {
        current.pk: {"temperature", "humidity", "battery", "pressure", *odd},  # pressure: no readings
        never_seen.pk: {"temperature"},
        clock_behind.pk: {"temperature"},
        seen_later.pk: {"temperature", "humidity"},
        -1: {"temperature"},  # no such device
    }
    latest = latest_readings(asked)

    assert latest == unbounded(asked)
    assert latest[current.pk]["temperature"] == (NOW - timedelta(minutes=10), 21.5)
    assert latest[current.pk]["humidity"] == (NOW - timedelta(days=40), 55.0)
    assert latest[current.pk]["battery"] == (NOW + timedelta(days=60), 89.0)
    assert "pressure" not in latest[current.pk]
    assert {name: latest[current.pk][name][1] for name in odd} == {name: float(i) for i, name in enumerate(odd)}
    assert latest[never_seen.pk] == {"temperature": (NOW - timedelta(hours=3), 18.0)}
    assert latest[clock_behind.pk] == {"temperature": (NOW - LATEST_WINDOW - timedelta(hours=5), 16.0)}
    assert latest[seen_later.pk] == {"temperature": (NOW, 15.0)}
    assert -1 not in latest
    assert latest_readings({}) == {}
    assert latest_readings({current.pk: set()}) == {}


def test_text_array_round_trips_any_string(in_alpha: TenantPersona) -> None:
    values = ["plain", "a,b", 'q"uote', "back\\slash", "NULL", "", " spaced ", "{braces}", "üñí"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s::text[]", [text_array(values)])
        row = cursor.fetchone()
    assert row is not None and row[0] == values


def test_history_buckets_and_points_across_partitions(in_alpha: TenantPersona) -> None:
    device = make_device(make_device_type())
    day = NOW.replace(hour=0, minute=0, second=0)
    # Yesterday's last two minutes and today's first three, a reading every 20 s, values 0, 1, 2, ...
    times = [day - timedelta(minutes=2) + timedelta(seconds=20 * i) for i in range(15)]
    insert(device.pk, "temperature", *[(t, float(i)) for i, t in enumerate(times)])
    insert(device.pk, "humidity", (day, 99.0))

    buckets = history_buckets(
        device_id=device.pk,
        metric="temperature",
        start=day - timedelta(minutes=2),
        end=day + timedelta(minutes=3),
        bucket=timedelta(minutes=1),
    )
    assert [b.time for b in buckets] == [day + timedelta(minutes=m) for m in range(-2, 3)]
    assert all(b.time.tzinfo is not None and b.time.utcoffset() == timedelta(0) for b in buckets)
    assert [(b.min, b.max, b.avg, b.count) for b in buckets] == [
        (3.0 * m, 3.0 * m + 2, 3.0 * m + 1, 3) for m in range(5)
    ]

    first = history_points(device_id=device.pk, metric="temperature", start=times[1], end=times[-1], limit=6)
    assert first == [Point(t, float(i)) for i, t in enumerate(times[1:7], start=1)]
    rest = history_points(
        device_id=device.pk, metric="temperature", start=times[1], end=times[-1], after=first[-1].time, limit=100
    )
    assert rest == [Point(t, float(i)) for i, t in enumerate(times[7:-1], start=7)]
    assert all(p.time.utcoffset() == timedelta(0) for p in first + rest)
