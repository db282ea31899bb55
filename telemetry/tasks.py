"""Maintenance tasks of the telemetry tables."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings
from django.db import connection
from django_tenants.utils import get_tenant_model, schema_context


def partitions_ensure(days_ahead: int) -> int:
    """Create the daily telemetry_history partitions of the current tenant from yesterday on."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT telemetry_history_ensure_partitions((now() AT TIME ZONE 'UTC')::date - 1, %s)", [days_ahead + 2]
        )
        row = cursor.fetchone()
        return int(row[0]) if row else 0


@shared_task
def partitions_ensure_all() -> int:
    """Create tomorrow's (and the next days') partitions in every tenant."""
    created = 0
    for tenant in get_tenant_model().objects.exclude(schema_name="public"):
        with schema_context(tenant.schema_name):
            created += partitions_ensure(settings.ARGUS_PARTITION_DAYS_AHEAD)
    return created
