"""Health algorithms: their parameter schemas (validated in the admin) and their scoring."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NUMBER = {"type": "number"}


@dataclass(frozen=True)
class OpenAlert:
    """An alert not yet resolved, as the threshold algorithm sees it."""

    id: int
    rule: str
    metric: str
    severity: str


@dataclass(frozen=True)
class HealthInputs:
    """What a score is computed from: the asset's latest value of every metric (transformed and
    renamed to the asset's metrics, across all its devices) and its open alerts."""

    values: Mapping[str, float]
    open_alerts: Sequence[OpenAlert] = ()


@dataclass(frozen=True)
class HealthResult:
    """A score with what it is made of (kept with the score and shown to operators)."""

    score: float
    explanation: dict[str, Any]


@dataclass(frozen=True)
class HealthAlgorithm:
    """A named, versioned way of turning an asset's inputs into a 0-100 score and its explanation.
    The version goes up whenever the same inputs can give another score."""

    name: str
    label: str
    version: int
    parameters_schema: dict[str, Any]
    referenced_metrics: Callable[[Mapping[str, Any]], set[str]]
    evaluate: Callable[[Mapping[str, Any], Mapping[str, dict[str, Any]], HealthInputs], HealthResult | None]


def _weighted_metrics(params: Mapping[str, Any]) -> set[str]:
    return set(params.get("weights", {})) | set(params.get("ranges", {}))


def _ranges(
    params: Mapping[str, Any], metric: str, definition: Mapping[str, Any]
) -> tuple[tuple[float | None, float | None], tuple[float | None, float | None]]:
    """(normal, critical) bounds of one metric: given in `ranges`, else normal from the metric
    definition's min/max and critical one range-width (times `tolerance`) beyond each bound."""
    given = params.get("ranges", {}).get(metric, {})
    low, high = given.get("normal", [definition.get("min"), definition.get("max")])
    if "critical" in given:
        critical_low, critical_high = given["critical"]
        return (low, high), (critical_low, critical_high)
    width = (high - low) if low is not None and high is not None and high > low else 1.0
    width *= params.get("tolerance", 1.0)
    return (low, high), (None if low is None else low - width, None if high is None else high + width)


def _sub_score(
    value: float, normal: tuple[float | None, float | None], critical: tuple[float | None, float | None]
) -> float:
    """100 inside the normal range, falling linearly to 0 at the critical bound (and 0 beyond)."""
    (low, high), (critical_low, critical_high) = normal, critical
    if low is not None and value < low:
        if critical_low is None or critical_low >= low:
            return 0.0
        return max(0.0, 100.0 * (value - critical_low) / (low - critical_low))
    if high is not None and value > high:
        if critical_high is None or critical_high <= high:
            return 0.0
        return max(0.0, 100.0 * (critical_high - value) / (critical_high - high))
    return 100.0


def _weighted(
    params: Mapping[str, Any], definitions: Mapping[str, dict[str, Any]], inputs: HealthInputs
) -> HealthResult | None:
    """The weighted mean of the sub-scores of the metrics that have a value."""
    total_weight = 0.0
    total = 0.0
    metrics: list[dict[str, Any]] = []
    missing: list[str] = []
    for metric, weight in sorted(params["weights"].items()):
        value = inputs.values.get(metric)
        if value is None:
            missing.append(metric)
            continue
        normal, critical = _ranges(params, metric, definitions.get(metric, {}))
        sub = round(_sub_score(value, normal, critical), 2)
        metrics.append(
            {
                "metric": metric,
                "value": value,
                "score": sub,
                "weight": weight,
                "normal": list(normal),
                "critical": list(critical),
            }
        )
        total += weight * sub
        total_weight += weight
    if total_weight == 0:
        return None
    score = round(total / total_weight, 2)
    return HealthResult(score, {"metrics": metrics, "missing": missing})


DEFAULT_PENALTIES = {"info": 5.0, "warning": 20.0, "critical": 50.0}


def _penalties(
    params: Mapping[str, Any], definitions: Mapping[str, dict[str, Any]], inputs: HealthInputs
) -> HealthResult:
    """100 minus a penalty per open (or acknowledged) alert by its severity, never below 0."""
    penalties = {**DEFAULT_PENALTIES, **params.get("penalties", {})}
    costs = [
        {
            "alert": a.id,
            "rule": a.rule,
            "metric": a.metric,
            "severity": a.severity,
            "penalty": penalties.get(a.severity, 0.0),
        }
        for a in sorted(inputs.open_alerts, key=lambda a: a.id)
    ]
    score = round(max(0.0, 100.0 - sum(c["penalty"] for c in costs)), 2)
    return HealthResult(score, {"alerts": costs, "penalties": penalties})


RANGE = {"type": "array", "items": NUMBER, "minItems": 2, "maxItems": 2}

ALGORITHMS: dict[str, HealthAlgorithm] = {
    "none": HealthAlgorithm(
        name="none",
        label="No health score",
        version=1,
        parameters_schema={"type": "object", "maxProperties": 0},
        referenced_metrics=lambda params: set(),
        evaluate=lambda params, definitions, inputs: None,
    ),
    "weighted": HealthAlgorithm(
        name="weighted",
        label="Weighted mean of metrics within their normal ranges",
        version=2,
        parameters_schema={
            "type": "object",
            "required": ["weights"],
            "additionalProperties": False,
            "properties": {
                "weights": {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": {"type": "number", "exclusiveMinimum": 0},
                },
                "tolerance": {"type": "number", "exclusiveMinimum": 0},
                "ranges": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"normal": RANGE, "critical": RANGE},
                    },
                },
            },
        },
        referenced_metrics=_weighted_metrics,
        evaluate=_weighted,
    ),
    "threshold": HealthAlgorithm(
        name="threshold",
        label="100 minus a penalty per open alert, by severity",
        version=2,
        parameters_schema={
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "penalties": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {s: {"type": "number", "minimum": 0, "maximum": 100} for s in DEFAULT_PENALTIES},
                },
            },
        },
        referenced_metrics=lambda params: set(),
        evaluate=_penalties,
    ),
}


def range_errors(params: Mapping[str, Any]) -> list[str]:
    """Bounds out of order in a weighted algorithm's `ranges` (critical low <= normal low <=
    normal high <= critical high)."""
    errors = []
    for metric, given in params.get("ranges", {}).items():
        normal = given.get("normal")
        critical = given.get("critical")
        if normal and normal[0] > normal[1]:
            errors.append(f"{metric}: the normal range's low bound is above its high bound.")
        if critical and critical[0] > critical[1]:
            errors.append(f"{metric}: the critical range's low bound is above its high bound.")
        if normal and critical and not (critical[0] <= normal[0] and normal[1] <= critical[1]):
            errors.append(f"{metric}: the critical range must contain the normal range.")
    return errors


ALGORITHM_CHOICES = [(a.name, a.label) for a in ALGORITHMS.values()]

METRIC_DEFINITIONS_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["key"],
        "additionalProperties": False,
        "properties": {
            "key": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$"},
            "label": {"type": "string"},
            "unit": {"type": "string"},
            "min": NUMBER,
            "max": NUMBER,
        },
    },
}

TRANSFORMATION_SCHEMAS: dict[str, dict[str, Any]] = {
    "none": {"type": "object", "maxProperties": 0},
    # value * scale + offset per metric, e.g. a sensor that reports tenths of a degree.
    "linear": {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"scale": NUMBER, "offset": NUMBER},
        },
    },
}
