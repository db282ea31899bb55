"""Validation of the JSON configuration fields of device and asset profiles.

Each function returns `{field: [messages]}` so model `clean()` methods can show every error
next to its field in the admin.
"""

from __future__ import annotations

import re
from typing import Any

import fastjsonschema
import jsonschema
from jsonschema.exceptions import SchemaError, best_match

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


# Keywords newer than draft 7, which fastjsonschema does not know (it would ignore them).
NEWER_KEYWORDS = frozenset(
    {
        "$defs",
        "$dynamicRef",
        "$dynamicAnchor",
        "$anchor",
        "$vocabulary",
        "prefixItems",
        "dependentRequired",
        "dependentSchemas",
        "unevaluatedProperties",
        "unevaluatedItems",
        "minContains",
        "maxContains",
    }
)


def _keywords(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = set(node)
        for value in node.values():
            found |= _keywords(value)
        return found
    if isinstance(node, list):
        return set().union(*(_keywords(v) for v in node)) if node else set()
    return set()


class MessageValidator:
    """A device type's JSON Schema, compiled for the ingest hot path.

    jsonschema is the authority (and writes the error messages); where the schema uses only
    draft-7 keywords, fastjsonschema's generated code answers "valid" about 20x faster first.
    """

    def __init__(self, schema: dict[str, Any]) -> None:
        self._full = jsonschema.validators.validator_for(schema)(schema)
        self._fast: Any = None
        if not _keywords(schema) & NEWER_KEYWORDS:
            try:
                self._fast = fastjsonschema.compile(schema)
            except fastjsonschema.JsonSchemaDefinitionException:
                self._fast = None

    def error(self, document: Any) -> str | None:
        """The first violation as `schema: <path>: <message>`, or None when the document is valid."""
        if self._fast is not None:
            try:
                self._fast(document)
                return None
            except fastjsonschema.JsonSchemaValueException:
                pass  # let jsonschema decide and explain
        error = best_match(self._full.iter_errors(document))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return f"schema: {where}: {error.message[:300]}"
