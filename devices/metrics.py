"""Fleet gauges read from the database when the web process's /metrics is scraped: devices online
and inactive per tenant (argus_devices_online, argus_devices_inactive).

Computed at scrape time, not kept by a worker: presence is written by every runingest process,
and a gauge each of them kept would count only what it saw. Wired in by
settings.ARGUS_WEB_METRICS_COLLECTORS (argus/metrics.py), so only the web /metrics reports them:
one series per tenant, whichever of the gunicorn workers answers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from django.db import DatabaseError
from django.db.models import Count, Q
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from argus.outage import close_broken_connection
from argus.registry import each_tenant_schema
from devices.models import Device, inactive_condition

log = logging.getLogger(__name__)


def presence_counts() -> dict[str, tuple[int, int]]:
    """tenant schema -> (devices online, devices inactive); two counts in one query per tenant."""
    counts = {}
    for schema in each_tenant_schema():
        totals = Device.objects.aggregate(
            online=Count("id", filter=Q(online=True)), inactive=Count("id", filter=inactive_condition())
        )
        counts[schema] = (totals["online"], totals["inactive"])
    return counts


class PresenceCollector(Collector):
    """argus_devices_online / argus_devices_inactive{tenant}."""

    def collect(self) -> Iterator[Metric]:
        online = GaugeMetricFamily(
            "argus_devices_online", "Devices whose status topic last said online", labels=["tenant"]
        )
        inactive = GaugeMetricFamily(
            "argus_devices_inactive",
            "Devices silent for ARGUS_PRESENCE_INACTIVE_INTERVALS of their type's expected interval",
            labels=["tenant"],
        )
        try:
            counts = presence_counts()
        except DatabaseError as exc:
            # The scrape still answers, without these gauges: the request metrics matter most
            # while the database is down (or not migrated yet).
            log.warning("presence gauges skipped, the database did not answer: %s", exc)
            close_broken_connection()
            counts = {}
        for schema, (n_online, n_inactive) in sorted(counts.items()):
            online.add_metric([schema], n_online)
            inactive.add_metric([schema], n_inactive)
        yield online
        yield inactive
