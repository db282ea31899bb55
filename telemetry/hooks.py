"""What other apps do when telemetry is stored, without telemetry importing them.

The apps above telemetry (assets: alerts, health scores, an asset's last telemetry) name their
functions in settings.ARGUS_TELEMETRY_HOOKS; telemetry calls them at three points. A hook runs
in the tenant's schema.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils.module_loading import import_string

from telemetry.messages import LatestValues


@functools.cache
def _hook(name: str) -> Callable[..., Any] | None:
    path = settings.ARGUS_TELEMETRY_HOOKS.get(name)
    return import_string(path) if path else None


def batch_committed(latest: LatestValues) -> None:
    """runingest, after a batch committed (on its database thread): the newest values per
    device. Must be quick (it runs between batches): hand the work to Celery."""
    hook = _hook("batch_committed")
    if hook is not None and latest:
        hook(latest)


def transaction_reassembled(latest: LatestValues) -> None:
    """Celery, after a chunked transaction was stored: the newest values per child device."""
    hook = _hook("transaction_reassembled")
    if hook is not None and latest:
        hook(latest)


def devices_heard(heard: datetime, device_ids: list[int], resolution: float) -> None:
    """Inside the storing transaction, when devices' last_seen moves on (at most once per
    resolution per device): the time and the devices."""
    hook = _hook("devices_heard")
    if hook is not None:
        hook(heard, device_ids, resolution)
