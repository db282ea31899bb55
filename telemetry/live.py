"""What telemetry tells open pages (argus/live.py) once readings are stored."""

from __future__ import annotations

from datetime import datetime

from argus import live
from telemetry.messages import LatestValues, Presence


def live_stored(schema: str, *, messages: int, readings: int, latest: LatestValues) -> None:
    """Counts and the newest values per device of what a batch or a reassembly stored."""
    live.note_counts(schema, messages=messages, readings=readings)
    # A reassembly's 2000 children mostly share one or a few times: each formatted once (formatting
    # every child's time was a tenth of a reassembly in the chunk benchmark's profile).
    formatted: dict[datetime, str] = {}
    items = {}
    for device_id, (time, values) in latest.items():
        text = formatted.get(time)
        if text is None:
            text = formatted[time] = time.isoformat()
        items[str(device_id)] = {"time": text, "values": values}
    live.note(schema, "devices", items)


def live_presence(schema: str, presence: dict[int, Presence]) -> None:
    """Devices whose presence (online/offline) a batch changed."""
    live.note(
        schema,
        "presence",
        {
            str(d): {"online": p.online, "since": p.since.isoformat(), "reason": p.last_disconnect_reason}
            for d, p in presence.items()
        },
    )
