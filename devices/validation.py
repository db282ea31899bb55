"""Validation of the JSON configuration fields of device and asset profiles.

Each function returns `{field: [messages]}` so model `clean()` methods can show every error
next to its field in the admin.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

METRIC_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")

Errors = dict[str, list[str]]


def message_schema_errors(schema: Any, field: str = "message_schema") -> Errors:
    """Errors of a JSON Schema document (empty dict = no schema, allowed)."""
    if not isinstance(schema, dict):
        return {field: ["Must be a JSON object (a JSON Schema)."]}
    if not schema:
        return {}
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return {field: [f"Not a valid JSON Schema at {where}: {exc.message}"]}
    return {}


def metric_key_list_errors(field: str, keys: Any) -> Errors:
    """Errors of a list of unique metric keys."""
    if not isinstance(keys, list):
        return {field: ["Must be a JSON list of metric keys."]}
    errors = []
    for key in keys:
        if not isinstance(key, str) or not METRIC_KEY.match(key):
            errors.append(f"{key!r} is not a metric key (letters, digits, _ and ., at most 64).")
    duplicates = sorted({k for k in keys if isinstance(k, str) and keys.count(k) > 1})
    if duplicates:
        errors.append(f"Listed more than once: {', '.join(duplicates)}.")
    return {field: errors} if errors else {}


def json_document_errors(field: str, document: Any, schema: dict[str, Any]) -> Errors:
    """Errors of a configuration document against the JSON Schema that describes it."""
    validator = jsonschema.Draft202012Validator(schema)
    messages = []
    for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        messages.append(f"{where}: {error.message}")
    return {field: messages} if messages else {}
