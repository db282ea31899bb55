"""Threshold alerts: each rule's state per asset, advanced by readings in device time and by the
sweep as time passes; the alert lifecycle open -> acknowledged -> resolved; the events that
webhooks receive. Semantics, with a timeline: docs/alerts-and-health.md.

Concurrency: every change to a rule's standing for an asset happens with its `rule_states` row
locked (taken in id order, so two workers never deadlock), and the database allows one
unresolved alert per rule and asset (`alerts_one_open_per_rule_asset`). Two workers evaluating
the same asset at once therefore serialize, and neither can open a second alert.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from assets.models import (
    Alert,
    AlertEvent,
    AlertStatus,
    Asset,
    Resolution,
    RuleOperator,
    RuleState,
    ThresholdRule,
)
from assets.values import AssetReadings
from assets.webhooks import deliveries_record

log = logging.getLogger(__name__)

OPEN = "open"
RESOLVE = "resolve"


@dataclass
class AlertChanges:
    """What an evaluation changed: counts, the webhook deliveries to send after commit, and the
    assets whose alerts changed (their threshold-algorithm health moves)."""

    opened: int = 0
    resolved: int = 0
    acknowledged: int = 0
    deliveries: list[int] = field(default_factory=list)
    assets: set[int] = field(default_factory=set)
    # The alerts opened, acknowledged or resolved (for open pages: argus/live.py).
    alerts: set[int] = field(default_factory=set)

    def merge(self, other: AlertChanges) -> None:
        self.opened += other.opened
        self.resolved += other.resolved
        self.acknowledged += other.acknowledged
        self.deliveries += other.deliveries
        self.assets |= other.assets
        self.alerts |= other.alerts


# --- The rule's state machine (pure: no database) ------------------------------------------


def advance(
    rule: ThresholdRule, state: RuleState, alert_open: bool, time: datetime, value: float, now: datetime
) -> str | None:
    """Apply one reading (device time, transformed value) to a rule's state for an asset.

    Returns OPEN, RESOLVE or None, and updates `state`. A reading not newer than the newest one
    already evaluated changes nothing: back-filled data never moves the state backwards.
    """
    if state.last_time is not None and time <= state.last_time:
        return None
    state.last_time, state.last_value, state.heard_at = time, value, now
    if rule.is_no_data:
        state.breach_since = None
        return RESOLVE if alert_open else None
    if alert_open:
        # Inside the hysteresis band the alert stays open: no flapping around the threshold.
        if rule.cleared(value):
            state.breach_since = None
            return RESOLVE
        return None
    if not rule.breached(value):
        state.breach_since = None  # the run of breaching readings is broken
        return None
    if state.breach_since is None:
        state.breach_since = time
    return OPEN if time - state.breach_since >= timedelta(seconds=rule.duration_seconds) else None


def due(rule: ThresholdRule, state: RuleState, alert_open: bool, now: datetime) -> str | None:
    """What time alone decides (the sweep): a duration rule whose condition has held long enough
    with no reading since to break it, or a no-data rule whose metric has been silent too long.

    The device's "now" is estimated as its last reading's time plus the wall-clock time since
    that reading arrived, so a device whose clock is off is judged by its own clock.
    """
    if alert_open:
        return None
    if rule.is_no_data:
        silent = now - state.heard_at
        return OPEN if silent >= timedelta(seconds=rule.no_data_seconds or 0) else None
    if state.breach_since is None or state.last_time is None:
        return None
    device_now = state.last_time + (now - state.heard_at)
    return OPEN if device_now - state.breach_since >= timedelta(seconds=rule.duration_seconds) else None


# --- Evaluation ---------------------------------------------------------------------------


def rules_for(assets: Iterable[Asset]) -> dict[int, list[ThresholdRule]]:
    """The enabled rules of each asset: its own and its type's."""
    assets = list(assets)
    asset_ids = [a.pk for a in assets]
    type_ids = {a.asset_type_id for a in assets}
    rules = list(
        ThresholdRule.objects.filter(enabled=True).filter(Q(asset_id__in=asset_ids) | Q(asset_type_id__in=type_ids))
    )
    return {
        a.pk: [r for r in rules if r.asset_id == a.pk or (r.asset_id is None and r.asset_type_id == a.asset_type_id)]
        for a in assets
    }


def _locked_states(pairs: set[tuple[int, int]], now: datetime) -> dict[tuple[int, int], RuleState]:
    """The state rows of these (rule, asset) pairs, created if missing, locked in id order."""
    if not pairs:
        return {}
    RuleState.objects.bulk_create(
        [RuleState(rule_id=r, asset_id=a, heard_at=now) for r, a in sorted(pairs)], ignore_conflicts=True
    )
    rule_ids = sorted({r for r, _ in pairs})
    asset_ids = sorted({a for _, a in pairs})
    rows = RuleState.objects.select_for_update().filter(rule_id__in=rule_ids, asset_id__in=asset_ids).order_by("pk")
    return {(s.rule_id, s.asset_id): s for s in rows if (s.rule_id, s.asset_id) in pairs}


def _open_alerts(pairs: set[tuple[int, int]]) -> dict[tuple[int, int], Alert]:
    if not pairs:
        return {}
    rows = (
        Alert.objects.select_for_update(of=("self",))
        .select_related("rule", "asset")
        .filter(rule_id__in={r for r, _ in pairs}, asset_id__in={a for _, a in pairs})
        .exclude(status=AlertStatus.RESOLVED)
        .order_by("pk")
    )
    return {(a.rule_id, a.asset_id): a for a in rows}


def alerts_evaluate(*, assets: dict[int, Asset], readings: AssetReadings) -> AlertChanges:
    """Advance every rule of these assets by their newest readings (one committed batch, or the
    stored newest values in the periodic recompute); open and resolve alerts accordingly."""
    changes = AlertChanges()
    rules_of = rules_for(assets.values())
    work: list[tuple[ThresholdRule, Asset, float, datetime, int]] = []
    for asset_id, metrics in readings.items():
        for rule in rules_of.get(asset_id, []):
            reading = metrics.get(rule.metric)
            if reading is not None:
                work.append((rule, assets[asset_id], reading.value, reading.time, reading.device_id))
    if not work:
        return changes
    now = timezone.now()
    with transaction.atomic():
        pairs = {(rule.pk, asset.pk) for rule, asset, *_ in work}
        states = _locked_states(pairs, now)
        alerts = _open_alerts(pairs)
        touched: list[RuleState] = []
        for rule, asset, value, time, device_id in work:
            state = states[(rule.pk, asset.pk)]
            alert = alerts.get((rule.pk, asset.pk))
            since = state.breach_since
            action = advance(rule, state, alert is not None, time, value, now)
            touched.append(state)
            if action == OPEN:
                alerts[(rule.pk, asset.pk)] = _open(
                    rule, asset, changes, value=value, condition_since=since or time, device_id=device_id, now=now
                )
            elif action == RESOLVE and alert is not None:
                _resolve(alert, changes, now=now, resolution=Resolution.AUTO, value=value)
                del alerts[(rule.pk, asset.pk)]
            elif alert is not None and alert.last_value != value:
                alert.last_value = value
                alert.save(update_fields=["last_value"])
        RuleState.objects.bulk_update(touched, ["breach_since", "last_time", "last_value", "heard_at"])
    return changes


def alerts_sweep() -> AlertChanges:
    """The beat sweep (this tenant): duration rules whose condition has held long enough since
    the last reading, and no-data rules whose metric has gone silent."""
    changes = AlertChanges()
    now = timezone.now()
    rules = list(
        ThresholdRule.objects.filter(enabled=True)
        .filter(Q(operator=RuleOperator.NO_DATA) | Q(duration_seconds__gt=0))
        .select_related("asset")
    )
    if not rules:
        return changes
    with transaction.atomic():
        # A no-data rule watches every asset in its scope, heard from or not: an asset that
        # never reported starts its silence when the rule first sees it.
        no_data = [r for r in rules if r.is_no_data]
        if no_data:
            scoped = _assets_in_scope(no_data)
            RuleState.objects.bulk_create(
                [RuleState(rule_id=r.pk, asset_id=a, heard_at=now) for r in no_data for a in scoped[r.pk]],
                ignore_conflicts=True,
            )
        by_id = {r.pk: r for r in rules}
        # Rows a batch evaluation holds are skipped: it decides them, the next sweep sees the rest.
        states = list(
            RuleState.objects.select_for_update(skip_locked=True)
            .filter(rule_id__in=list(by_id))
            .filter(Q(breach_since__isnull=False) | Q(rule__operator=RuleOperator.NO_DATA))
            .select_related("asset")
            .order_by("pk")
        )
        alerts = _open_alerts({(s.rule_id, s.asset_id) for s in states})
        for state in states:
            rule = by_id[state.rule_id]
            if due(rule, state, (rule.pk, state.asset_id) in alerts, now) != OPEN:
                continue
            since = state.last_time if rule.is_no_data else state.breach_since
            value = None if rule.is_no_data else state.last_value
            _open(rule, state.asset, changes, value=value, condition_since=since, device_id=None, now=now)
    return changes


def _assets_in_scope(rules: list[ThresholdRule]) -> dict[int, list[int]]:
    type_ids = {r.asset_type_id for r in rules if r.asset_id is None}
    by_type: dict[int, list[int]] = {}
    for asset_id, type_id in Asset.objects.filter(asset_type_id__in=type_ids).values_list("pk", "asset_type_id"):
        by_type.setdefault(type_id, []).append(asset_id)
    return {r.pk: [r.asset_id] if r.asset_id is not None else by_type.get(r.asset_type_id or 0, []) for r in rules}


def _open(
    rule: ThresholdRule,
    asset: Asset,
    changes: AlertChanges,
    *,
    value: float | None,
    condition_since: datetime | None,
    device_id: int | None,
    now: datetime,
) -> Alert:
    shown = "no data" if value is None else f"{value:g}"
    alert = Alert.objects.create(
        rule=rule,
        asset=asset,
        device_id=device_id,
        metric=rule.metric,
        value=value,
        last_value=value,
        severity=rule.severity,
        status=AlertStatus.OPEN,
        condition_since=condition_since,
        raised_at=now,
        message=f"{asset.name}: {rule.describe()} ({rule.metric} = {shown})",
    )
    changes.opened += 1
    changes.alerts.add(alert.pk)
    changes.assets.add(asset.pk)
    changes.deliveries += deliveries_record(alert=alert, event=AlertEvent.OPENED)
    log.info("alert opened id=%s asset=%s rule=%s value=%s", alert.pk, asset.name, rule.name, shown)
    return alert


def _resolve(
    alert: Alert,
    changes: AlertChanges,
    *,
    now: datetime,
    resolution: Resolution,
    value: float | None = None,
    user: AbstractBaseUser | None = None,
) -> None:
    alert.status = AlertStatus.RESOLVED
    alert.resolved_at = now
    alert.resolution = resolution
    alert.resolved_by = user  # type: ignore[assignment]
    if value is not None:
        alert.last_value = value
    alert.save(update_fields=["status", "resolved_at", "resolution", "resolved_by", "last_value"])
    changes.resolved += 1
    changes.alerts.add(alert.pk)
    changes.assets.add(alert.asset_id)
    changes.deliveries += deliveries_record(alert=alert, event=AlertEvent.RESOLVED)
    log.info("alert resolved id=%s asset_id=%s resolution=%s", alert.pk, alert.asset_id, resolution)


# --- By hand ------------------------------------------------------------------------------


class AlertTransitionError(Exception):
    """The alert is not in a state that allows the action (e.g. acknowledging a resolved alert)."""


def alert_acknowledge(*, alert_id: int, user: AbstractBaseUser) -> tuple[Alert, AlertChanges]:
    """An operator has seen the alert: open -> acknowledged (who and when are kept)."""
    changes = AlertChanges()
    with transaction.atomic():
        alert = Alert.objects.select_for_update(of=("self",)).select_related("rule", "asset").get(pk=alert_id)
        if alert.status != AlertStatus.OPEN:
            raise AlertTransitionError(f"The alert is {alert.status}; only an open alert can be acknowledged.")
        alert.status = AlertStatus.ACKNOWLEDGED
        alert.acknowledged_at = timezone.now()
        alert.acknowledged_by = user  # type: ignore[assignment]
        alert.save(update_fields=["status", "acknowledged_at", "acknowledged_by"])
        changes.acknowledged += 1
        changes.alerts.add(alert.pk)
        changes.assets.add(alert.asset_id)
        changes.deliveries += deliveries_record(alert=alert, event=AlertEvent.ACKNOWLEDGED)
    return alert, changes


def alert_resolve(*, alert_id: int, user: AbstractBaseUser) -> tuple[Alert, AlertChanges]:
    """An operator closes the alert by hand. The rule starts afresh: if the condition still holds,
    it opens a new alert once it has held for the rule's duration again."""
    changes = AlertChanges()
    with transaction.atomic():
        peek = Alert.objects.only("rule_id", "asset_id").get(pk=alert_id)
        # The state row first, as every evaluation takes it: no deadlock with a worker.
        state = RuleState.objects.select_for_update().filter(rule_id=peek.rule_id, asset_id=peek.asset_id).first()
        alert = Alert.objects.select_for_update(of=("self",)).select_related("rule", "asset").get(pk=alert_id)
        if alert.status == AlertStatus.RESOLVED:
            raise AlertTransitionError("The alert is resolved already.")
        now = timezone.now()
        _resolve(alert, changes, now=now, resolution=Resolution.MANUAL, user=user)
        if state is not None:
            state.breach_since = None
            if alert.rule.is_no_data:
                state.heard_at = now  # the silence is counted again from now
            state.save(update_fields=["breach_since", "heard_at"])
    return alert, changes
