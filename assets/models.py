"""Asset types, assets and the devices that feed them, threshold rules and alerts (tenant schema)."""

from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Q

from argus.outbound import url_errors
from assets.health import (
    ALGORITHM_CHOICES,
    ALGORITHMS,
    METRIC_DEFINITIONS_SCHEMA,
    TRANSFORMATION_SCHEMAS,
    range_errors,
)
from devices.models import Device, DeviceType
from devices.validation import Errors, json_document_errors


class AssetCategory(models.TextChoices):
    EQUIPMENT = "equipment", "Equipment"
    FACILITY = "facility", "Facility"
    VEHICLE = "vehicle", "Vehicle"
    OTHER = "other", "Other"


class TransformationEngine(models.TextChoices):
    NONE = "none", "None"
    LINEAR = "linear", "Linear (scale and offset per metric)"


class AssetType(models.Model):
    """An asset profile: which metrics matter, how raw values are transformed and how health is scored."""

    name = models.CharField(max_length=120, unique=True)
    category = models.CharField(max_length=20, choices=AssetCategory.choices, default=AssetCategory.EQUIPMENT)
    description = models.TextField(blank=True)
    metric_definitions = models.JSONField(
        default=list,
        blank=True,
        help_text='[{"key": "temperature", "label": "Temperature", "unit": "°C", "min": 18, "max": 26}]',
    )
    transformation_engine = models.CharField(
        max_length=20, choices=TransformationEngine.choices, default=TransformationEngine.NONE
    )
    transformation_config = models.JSONField(default=dict, blank=True)
    health_algorithm = models.CharField(max_length=20, choices=ALGORITHM_CHOICES, default="none")
    health_parameters = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "asset_types"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def metric_keys(self) -> set[str]:
        """Keys of the metrics this type defines."""
        if not isinstance(self.metric_definitions, list):
            return set()
        return {d["key"] for d in self.metric_definitions if isinstance(d, dict) and "key" in d}

    def clean(self) -> None:
        errors: Errors = {}
        errors.update(json_document_errors("metric_definitions", self.metric_definitions, METRIC_DEFINITIONS_SCHEMA))
        if "metric_definitions" not in errors:
            errors.update(self._metric_definition_errors())
        defined = self.metric_keys()

        schema = TRANSFORMATION_SCHEMAS.get(self.transformation_engine)
        if schema is not None:
            errors.update(json_document_errors("transformation_config", self.transformation_config, schema))
            if "transformation_config" not in errors and isinstance(self.transformation_config, dict):
                unknown = sorted(set(self.transformation_config) - defined)
                if unknown:
                    errors["transformation_config"] = [f"Not in the metric definitions: {', '.join(unknown)}."]

        algorithm = ALGORITHMS.get(self.health_algorithm)
        if algorithm is not None:
            errors.update(
                json_document_errors("health_parameters", self.health_parameters, algorithm.parameters_schema)
            )
            if "health_parameters" not in errors:
                unknown = sorted(algorithm.referenced_metrics(self.health_parameters) - defined)
                problems = [f"Not in the metric definitions: {', '.join(unknown)}."] if unknown else []
                problems += range_errors(self.health_parameters)
                if problems:
                    errors["health_parameters"] = problems
        if errors:
            raise ValidationError(errors)

    def _metric_definition_errors(self) -> Errors:
        messages = []
        keys = [d["key"] for d in self.metric_definitions]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            messages.append(f"Defined more than once: {', '.join(duplicates)}.")
        known: set[str] = set()
        for metrics in DeviceType.objects.values_list("metrics", flat=True):
            if isinstance(metrics, list):
                known.update(m for m in metrics if isinstance(m, str))
        unknown = sorted(set(keys) - known)
        if unknown:
            messages.append(f"No device type reports these metrics: {', '.join(unknown)}.")
        for d in self.metric_definitions:
            if "min" in d and "max" in d and d["min"] > d["max"]:
                messages.append(f"{d['key']}: min is above max.")
        return {"metric_definitions": messages} if messages else {}


class Asset(models.Model):
    """A thing being monitored (a machine, a room) whose health is scored from its devices' telemetry."""

    asset_type = models.ForeignKey(AssetType, on_delete=models.PROTECT, related_name="assets")
    name = models.CharField(max_length=200, unique=True)
    location = models.CharField(max_length=200, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    devices: models.ManyToManyField[Device, AssetDevice] = models.ManyToManyField(
        Device, through="AssetDevice", related_name="assets", blank=True
    )
    health_score = models.DecimalField(
        max_digits=5,
        decimal_places=2,
        null=True,
        blank=True,
        validators=[MinValueValidator(0), MaxValueValidator(100)],
    )
    health_score_updated_at = models.DateTimeField(null=True, blank=True)
    health_score_computed_by = models.CharField(max_length=40, blank=True, help_text="<algorithm>@<version>")
    # What the score is made of: each metric's value, sub-score and weight, or the alerts that cost points.
    health_explanation = models.JSONField(default=dict, blank=True)
    last_telemetry_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "assets"
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(health_score__isnull=True) | Q(health_score__gte=0, health_score__lte=100),
                name="assets_health_score_range",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class AssetHealthScore(models.Model):
    """One change of an asset's health score, with its explanation: the score's history."""

    asset = models.ForeignKey(Asset, on_delete=models.CASCADE, related_name="health_scores")
    time = models.DateTimeField()
    score = models.DecimalField(max_digits=5, decimal_places=2)
    algorithm = models.CharField(max_length=20)
    version = models.PositiveSmallIntegerField()
    explanation = models.JSONField(default=dict)

    class Meta:
        db_table = "asset_health_scores"
        ordering = ["-time"]
        indexes = [models.Index(fields=["asset", "-time"], name="asset_health_scores_time_idx")]

    def __str__(self) -> str:
        return f"{self.asset}: {self.score} at {self.time:%Y-%m-%d %H:%M:%S}"


class AssetDevice(models.Model):
    """Links a device to an asset it feeds, optionally renaming device metrics to asset metrics."""

    asset = models.ForeignKey(Asset, on_delete=models.CASCADE, related_name="device_links")
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="asset_links")
    metric_mapping = models.JSONField(
        default=dict, blank=True, help_text='Device metric -> asset metric, e.g. {"temp": "temperature"}.'
    )

    class Meta:
        db_table = "asset_devices"
        constraints = [models.UniqueConstraint(fields=["asset", "device"], name="asset_devices_uniq")]

    def __str__(self) -> str:
        return f"{self.device} -> {self.asset}"

    def clean(self) -> None:
        if not isinstance(self.metric_mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.metric_mapping.items()
        ):
            raise ValidationError({"metric_mapping": "Must be an object of metric name to metric name."})


class Severity(models.TextChoices):
    INFO = "info", "Info"
    WARNING = "warning", "Warning"
    CRITICAL = "critical", "Critical"


class RuleOperator(models.TextChoices):
    GT = "gt", "greater than"
    GTE = "gte", "greater than or equal"
    LT = "lt", "less than"
    LTE = "lte", "less than or equal"
    OUTSIDE = "outside", "outside [threshold, threshold_high]"
    INSIDE = "inside", "inside [threshold, threshold_high]"
    NO_DATA = "no_data", "no reading for no_data_seconds"


RANGE_OPERATORS = (RuleOperator.OUTSIDE, RuleOperator.INSIDE)


class ThresholdRule(models.Model):
    """Raises an alert when a metric of an asset (or every asset of a type) crosses a threshold for
    `duration_seconds` of device time, or (operator `no_data`) stops arriving for `no_data_seconds`.
    The semantics, with a timeline, are in docs/alerts-and-health.md."""

    name = models.CharField(max_length=200)
    asset_type = models.ForeignKey(
        AssetType, null=True, blank=True, on_delete=models.CASCADE, related_name="threshold_rules"
    )
    asset = models.ForeignKey(Asset, null=True, blank=True, on_delete=models.CASCADE, related_name="threshold_rules")
    metric = models.CharField(max_length=64)
    operator = models.CharField(max_length=10, choices=RuleOperator.choices)
    threshold = models.FloatField(null=True, blank=True, help_text="Not used by the no-data operator.")
    threshold_high = models.FloatField(null=True, blank=True, help_text="Upper bound for range operators.")
    severity = models.CharField(max_length=10, choices=Severity.choices, default=Severity.WARNING)
    duration_seconds = models.PositiveIntegerField(
        default=0, help_text="The condition must hold this long (device time, without a break) before the alert opens."
    )
    hysteresis = models.FloatField(
        default=0,
        validators=[MinValueValidator(0)],
        help_text="How far back past the threshold the value must move to clear.",
    )
    no_data_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="For the no-data operator: open when the metric has not arrived for this long."
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "threshold_rules"
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(asset__isnull=False) | Q(asset_type__isnull=False), name="threshold_rules_has_scope"
            ),
            models.CheckConstraint(
                condition=~Q(operator__in=RANGE_OPERATORS)
                | Q(threshold_high__isnull=False, threshold_high__gt=F("threshold")),
                name="threshold_rules_range_bounds",
            ),
            models.CheckConstraint(condition=Q(hysteresis__gte=0), name="threshold_rules_hysteresis_positive"),
            models.CheckConstraint(
                condition=Q(operator=RuleOperator.NO_DATA) | Q(threshold__isnull=False),
                name="threshold_rules_threshold_set",
            ),
            models.CheckConstraint(
                condition=~Q(operator=RuleOperator.NO_DATA) | Q(no_data_seconds__gte=1),
                name="threshold_rules_no_data_seconds",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors: Errors = {}
        if self.asset_id is None and self.asset_type_id is None:
            errors["asset_type"] = ["Choose an asset type or an asset."]
        if self.operator == RuleOperator.NO_DATA:
            if not self.no_data_seconds:
                errors["no_data_seconds"] = ["The no-data operator needs no_data_seconds (at least 1)."]
        elif self.threshold is None:
            errors["threshold"] = ["This operator needs a threshold."]
        elif self.operator in RANGE_OPERATORS and (
            self.threshold_high is None or self.threshold_high <= self.threshold
        ):
            errors["threshold_high"] = ["Range operators need threshold_high above threshold."]
        asset_type = self.asset_type if self.asset_type_id else None
        if asset_type is None and self.asset is not None:
            asset_type = self.asset.asset_type
        if asset_type is not None and self.metric not in asset_type.metric_keys():
            errors["metric"] = [f"{asset_type} defines no metric {self.metric!r}."]
        if errors:
            raise ValidationError(errors)

    @property
    def is_no_data(self) -> bool:
        return self.operator == RuleOperator.NO_DATA

    def breached(self, value: float) -> bool:
        """Whether a value satisfies the alert condition (never, for a no-data rule)."""
        if self.threshold is None:
            return False
        high = self.threshold_high if self.threshold_high is not None else self.threshold
        return {
            RuleOperator.GT: value > self.threshold,
            RuleOperator.GTE: value >= self.threshold,
            RuleOperator.LT: value < self.threshold,
            RuleOperator.LTE: value <= self.threshold,
            RuleOperator.OUTSIDE: value < self.threshold or value > high,
            RuleOperator.INSIDE: self.threshold <= value <= high,
        }[RuleOperator(self.operator)]

    def cleared(self, value: float) -> bool:
        """Whether a value has moved back past the threshold by the rule's hysteresis (any value
        clears a no-data rule: data arrived)."""
        if self.threshold is None:
            return True
        h = self.hysteresis
        high = self.threshold_high if self.threshold_high is not None else self.threshold
        return {
            RuleOperator.GT: value <= self.threshold - h,
            RuleOperator.GTE: value < self.threshold - h,
            RuleOperator.LT: value >= self.threshold + h,
            RuleOperator.LTE: value > self.threshold + h,
            RuleOperator.OUTSIDE: self.threshold + h <= value <= high - h,
            RuleOperator.INSIDE: value < self.threshold - h or value > high + h,
        }[RuleOperator(self.operator)]

    def describe(self) -> str:
        """The condition in words, e.g. "temperature greater than 26 for 60 s"."""
        if self.is_no_data:
            return f"no {self.metric} for {self.no_data_seconds} s"
        bound = f"{self.threshold:g}"
        if self.operator in RANGE_OPERATORS:
            bound = f"[{self.threshold:g}, {self.threshold_high:g}]"
        words = RuleOperator(self.operator).label.split(" [")[0]
        held = f" for {self.duration_seconds} s" if self.duration_seconds else ""
        return f"{self.metric} {words} {bound}{held}"


class RuleState(models.Model):
    """Where one rule stands for one asset, in device time: since when its condition has held
    without a break, and the newest reading evaluated (older ones never move it back)."""

    rule = models.ForeignKey(ThresholdRule, on_delete=models.CASCADE, related_name="states")
    asset = models.ForeignKey(Asset, on_delete=models.CASCADE, related_name="rule_states")
    # Device time of the first reading of the current unbroken run of breaching readings.
    breach_since = models.DateTimeField(null=True, blank=True)
    # Device time and value of the newest reading evaluated, and when (wall clock) it arrived:
    # the sweep estimates the device's "now" as last_time + (now - heard_at).
    last_time = models.DateTimeField(null=True, blank=True)
    last_value = models.FloatField(null=True, blank=True)
    heard_at = models.DateTimeField()

    class Meta:
        db_table = "rule_states"
        constraints = [models.UniqueConstraint(fields=["rule", "asset"], name="rule_states_uniq")]

    def __str__(self) -> str:
        return f"{self.rule} on {self.asset}"


class AlertStatus(models.TextChoices):
    OPEN = "open", "Open"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"
    RESOLVED = "resolved", "Resolved"


class Resolution(models.TextChoices):
    AUTO = "auto", "The condition cleared"
    MANUAL = "manual", "Resolved by hand"


class Alert(models.Model):
    """An alert raised by a threshold rule for one asset: open -> acknowledged -> resolved, at
    most one not resolved per rule and asset (the database enforces it)."""

    rule = models.ForeignKey(ThresholdRule, on_delete=models.CASCADE, related_name="alerts")
    asset = models.ForeignKey(Asset, on_delete=models.CASCADE, related_name="alerts")
    device = models.ForeignKey(Device, null=True, blank=True, on_delete=models.SET_NULL, related_name="alerts")
    metric = models.CharField(max_length=64)
    # The (transformed) value that opened it; none for a no-data alert.
    value = models.FloatField(null=True, blank=True)
    severity = models.CharField(max_length=10, choices=Severity.choices)
    status = models.CharField(max_length=20, choices=AlertStatus.choices, default=AlertStatus.OPEN)
    message = models.TextField(blank=True)
    # Device time the condition began to hold (no-data: the last reading before the silence).
    condition_since = models.DateTimeField(null=True, blank=True)
    raised_at = models.DateTimeField(help_text="When Argus opened it.")
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    resolution = models.CharField(max_length=10, choices=Resolution.choices, blank=True)
    # The value that resolved it (auto), or the last one seen.
    last_value = models.FloatField(null=True, blank=True)

    class Meta:
        db_table = "alerts"
        ordering = ["-raised_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["rule", "asset"],
                condition=~Q(status=AlertStatus.RESOLVED),
                name="alerts_one_open_per_rule_asset",
            ),
        ]
        indexes = [models.Index(fields=["status", "-raised_at"], name="alerts_status_raised_idx")]

    def __str__(self) -> str:
        return f"{self.severity}: {self.rule} on {self.asset}"

    @property
    def is_open(self) -> bool:
        return self.status != AlertStatus.RESOLVED


def asset_type_metric_definitions(asset_type: AssetType) -> dict[str, dict[str, Any]]:
    """Metric definitions of an asset type keyed by metric."""
    return {d["key"]: d for d in asset_type.metric_definitions}


class AlertEvent(models.TextChoices):
    OPENED = "alert.opened", "Alert opened"
    ACKNOWLEDGED = "alert.acknowledged", "Alert acknowledged"
    RESOLVED = "alert.resolved", "Alert resolved"


def webhook_secret() -> str:
    return secrets.token_urlsafe(32)


def all_alert_events() -> list[str]:
    return [e.value for e in AlertEvent]


class WebhookEndpoint(models.Model):
    """Where a tenant's alert events are POSTed, signed with HMAC-SHA256 of the endpoint's secret
    (format and check: docs/alerts-and-health.md)."""

    name = models.CharField(max_length=120, unique=True)
    url = models.URLField(max_length=500, help_text="http(s) URL; private and loopback addresses are refused.")
    secret = models.CharField(max_length=128, default=webhook_secret, help_text="Signs every delivery.")
    events = models.JSONField(default=all_alert_events, blank=True, help_text="Events to send (all by default).")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "webhook_endpoints"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors: Errors = {}
        problem = url_errors(self.url)
        if problem:
            errors["url"] = [problem]
        known = set(all_alert_events())
        if not isinstance(self.events, list) or not all(isinstance(e, str) and e in known for e in self.events):
            errors["events"] = [f"A list of: {', '.join(sorted(known))}."]
        if errors:
            raise ValidationError(errors)


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed (gave up)"


class WebhookDelivery(models.Model):
    """One event for one endpoint: written in the transaction that changed the alert (an outbox),
    sent after commit, retried with backoff until delivered or out of attempts."""

    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries")
    alert = models.ForeignKey(Alert, null=True, blank=True, on_delete=models.SET_NULL, related_name="deliveries")
    event = models.CharField(max_length=40, choices=AlertEvent.choices)
    payload = models.JSONField()
    status = models.CharField(max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "webhook_deliveries"
        ordering = ["-created_at"]
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status="pending"),
                name="webhook_deliveries_due_idx",
            )
        ]

    def __str__(self) -> str:
        return f"{self.event} -> {self.endpoint} ({self.status})"
