"""Filters of the device list."""

from __future__ import annotations

import django_filters

from argus.api import TimeFilter
from devices.models import Device, DeviceRole, DeviceStatus


def strict_boolean(field_name: str, help_text: str) -> django_filters.TypedChoiceFilter:
    """`true` or `false`, anything else a 400 (a BooleanFilter ignores a value it cannot read, and
    `?online=yes` would list every device)."""
    return django_filters.TypedChoiceFilter(
        field_name=field_name,
        choices=[("true", "true"), ("false", "false")],
        coerce=lambda value: value == "true",
        help_text=help_text,
    )


class DeviceFilterSet(django_filters.FilterSet):
    type = django_filters.CharFilter(field_name="device_type__name", help_text="Device type name.")
    gateway = django_filters.CharFilter(
        field_name="parent_device__logical_identifier", help_text="Children of the gateway with this logical id."
    )
    role = django_filters.ChoiceFilter(field_name="device_role", choices=DeviceRole.choices)
    status = django_filters.ChoiceFilter(choices=DeviceStatus.choices)
    last_seen_after = TimeFilter(field_name="last_seen", lookup_expr="gte")
    last_seen_before = TimeFilter(field_name="last_seen", lookup_expr="lt")
    never_seen = django_filters.BooleanFilter(field_name="last_seen", lookup_expr="isnull")
    online = strict_boolean(
        "online", "Online (true) or offline (false), as its status topic last said (devices that never said: neither)."
    )
    inactive = strict_boolean(
        "inactive", "Silent for ARGUS_PRESENCE_INACTIVE_INTERVALS of its type's expected interval (true), or not."
    )

    class Meta:
        model = Device
        fields: list[str] = []
