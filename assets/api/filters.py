"""Filters of the asset and alert lists."""

from __future__ import annotations

import django_filters

from argus.api import TimeFilter
from assets.models import Alert, AlertStatus, Asset, Severity


class AssetFilterSet(django_filters.FilterSet):
    type = django_filters.CharFilter(field_name="asset_type__name", help_text="Asset type name.")
    health_below = django_filters.NumberFilter(field_name="health_score", lookup_expr="lt")

    class Meta:
        model = Asset
        fields: list[str] = []


class AlertFilterSet(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=AlertStatus.choices)
    severity = django_filters.ChoiceFilter(choices=Severity.choices)
    asset = django_filters.NumberFilter(field_name="asset_id", help_text="Asset id.")
    rule = django_filters.NumberFilter(field_name="rule_id", help_text="Rule id.")
    raised_after = TimeFilter(field_name="raised_at", lookup_expr="gte")
    raised_before = TimeFilter(field_name="raised_at", lookup_expr="lt")

    class Meta:
        model = Alert
        fields: list[str] = []
