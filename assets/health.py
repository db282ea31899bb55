"""Health algorithms: their parameter schemas (validated in the admin) and their scoring."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

NUMBER = {"type": "number"}

COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}


@dataclass(frozen=True)
class HealthAlgorithm:
    """A named way of turning an asset's latest metric values into a 0-100 score."""

    name: str
    label: str
    parameters_schema: dict[str, Any]
    referenced_metrics: Callable[[Mapping[str, Any]], set[str]]
    score: Callable[[Mapping[str, Any], Mapping[str, dict[str, Any]], Mapping[str, float]], float | None]


def _weighted_metrics(params: Mapping[str, Any]) -> set[str]:
    return set(params.get("weights", {}))


def _weighted_score(
    params: Mapping[str, Any], definitions: Mapping[str, dict[str, Any]], values: Mapping[str, float]
) -> float | None:
    """Weighted mean of per-metric scores: 100 inside [min, max], falling to 0 one range-width outside."""
    total_weight = 0.0
    total = 0.0
    for metric, weight in params["weights"].items():
        if metric not in values:
            continue
        definition = definitions.get(metric, {})
        low, high = definition.get("min"), definition.get("max")
        value = values[metric]
        width = (high - low) if low is not None and high is not None and high > low else 1.0
        width *= params.get("tolerance", 1.0)
        if low is not None and value < low:
            metric_score = max(0.0, 100.0 * (1 - (low - value) / width))
        elif high is not None and value > high:
            metric_score = max(0.0, 100.0 * (1 - (value - high) / width))
        else:
            metric_score = 100.0
        total += weight * metric_score
        total_weight += weight
    if total_weight == 0:
        return None
    return round(total / total_weight, 2)


def _threshold_metrics(params: Mapping[str, Any]) -> set[str]:
    return {rule["metric"] for rule in params.get("rules", [])}


def _threshold_score(
    params: Mapping[str, Any], definitions: Mapping[str, dict[str, Any]], values: Mapping[str, float]
) -> float | None:
    """The lowest score among the rules whose condition holds, else the default score."""
    seen = False
    score = float(params.get("default_score", 100))
    for rule in params["rules"]:
        value = values.get(rule["metric"])
        if value is None:
            continue
        seen = True
        if COMPARATORS[rule["operator"]](value, rule["value"]):
            score = min(score, float(rule["score"]))
    return score if seen else None


ALGORITHMS: dict[str, HealthAlgorithm] = {
    "none": HealthAlgorithm(
        name="none",
        label="No health score",
        parameters_schema={"type": "object", "maxProperties": 0},
        referenced_metrics=lambda params: set(),
        score=lambda params, definitions, values: None,
    ),
    "weighted": HealthAlgorithm(
        name="weighted",
        label="Weighted mean of metrics within their ranges",
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
            },
        },
        referenced_metrics=_weighted_metrics,
        score=_weighted_score,
    ),
    "threshold": HealthAlgorithm(
        name="threshold",
        label="Score set by threshold rules (lowest matching wins)",
        parameters_schema={
            "type": "object",
            "required": ["rules"],
            "additionalProperties": False,
            "properties": {
                "default_score": {"type": "number", "minimum": 0, "maximum": 100},
                "rules": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["metric", "operator", "value", "score"],
                        "additionalProperties": False,
                        "properties": {
                            "metric": {"type": "string"},
                            "operator": {"enum": sorted(COMPARATORS)},
                            "value": NUMBER,
                            "score": {"type": "number", "minimum": 0, "maximum": 100},
                        },
                    },
                },
            },
        },
        referenced_metrics=_threshold_metrics,
        score=_threshold_score,
    ),
}

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
