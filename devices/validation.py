"""Validation of the JSON configuration fields of device and asset profiles.

Each `*_errors` function returns `{field: [messages]}` so model `clean()` methods can show every
error next to its field in the admin.

A device type's message schema is written by a tenant admin and runs in every ingest process,
which hold the database URL and the secret key: it is data and stays data. jsonschema-rs
interprets it (fastjsonschema, used before, generated Python source from it, and a crafted
property name ran code). Before a schema is saved or used it must pass `compile_message_schema`:
bounded size and depth, references only within the schema (nothing is ever fetched), no
recursion, and patterns that compile for a linear-time regular expression engine.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any
from urllib.parse import unquote

import jsonschema
import jsonschema_rs

METRIC_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")

# Limits of a message schema. The project's own (seed, benchmarks) are at most 0.4 KB and 8 JSON
# levels deep; these leave room for hand-written ones while bounding what one tenant's schema
# costs every ingest process to check, compile and hold.
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
# Patterns run on a linear-time engine (the `regex` crate: `^(a+)+$` against 100,000 characters
# takes 0.3 ms), which has no look-around or back-references. What a pattern costs is memory: its
# compiled program (`\w{100}` 10 KB, `^\p{L}+$` 43 KB, `\w{5000}` 480 KB: refused) and its lazy
# DFA's cache, both bounded here; 64 patterns at the limits take 26 MB.
MAX_PATTERN_BYTES = 256 * 1024
MAX_PATTERNS = 64
# Keywords, values and containers once every $ref is replaced by what it names: references that
# share a definition can multiply it (40 levels of `allOf: [ref, ref]` is 2**40 checks per
# message). An `allOf` of 3,000 small schemas, 24,000 nodes, costs 42 µs per message.
MAX_EXPANDED_NODES = 20_000

# Keywords whose values are instances, not schemas: a "$ref" inside them is not a reference.
_DATA_KEYWORDS = frozenset({"const", "default", "enum", "examples"})
# Keywords whose values map names to schemas (a property may be called "$ref").
_SCHEMA_MAPS = frozenset(
    {"$defs", "definitions", "properties", "patternProperties", "dependentSchemas", "dependencies"}
)
# The drafts a schema may name in "$schema".
DRAFTS = ("draft/2020-12/schema", "draft/2019-09/schema", "draft-07/schema", "draft-06/schema", "draft-04/schema")
DIALECTS = frozenset(f"{scheme}://json-schema.org/{draft}" for draft in DRAFTS for scheme in ("http", "https"))

Errors = dict[str, list[str]]


class SchemaRefused(ValueError):
    """A message schema Argus will not run, and why."""


def message_schema_errors(schema: Any, field: str = "message_schema") -> Errors:
    """Errors of a device type's message schema (empty dict = no schema, allowed)."""
    if isinstance(schema, dict) and not schema:
        return {}
    try:
        compile_message_schema(schema)
    except SchemaRefused as exc:
        return {field: [str(exc)]}
    return {}


def compile_message_schema(schema: Any) -> jsonschema_rs.Validator:
    """The validator of a message schema, or SchemaRefused saying what is wrong with it."""
    if not isinstance(schema, dict):
        raise SchemaRefused("Must be a JSON object (a JSON Schema).")
    _check_size(schema)
    # Before the meta-schema check, which fetches a meta-schema that "$schema" names.
    _check_references(schema)
    try:
        jsonschema_rs.meta.validate(schema)
    except jsonschema_rs.ValidationError as exc:
        raise SchemaRefused(f"Not a valid JSON Schema at {_where(exc.instance_path)}: {exc.message}") from None
    try:
        return jsonschema_rs.validator_for(
            schema,
            offline=True,  # belt and braces: _check_references already refused anything remote
            validate_formats=False,  # as before: "format" annotates, it does not reject
            pattern_options=jsonschema_rs.RegexOptions(size_limit=MAX_PATTERN_BYTES, dfa_size_limit=MAX_PATTERN_BYTES),
        )
    except jsonschema_rs.ValidationError as exc:
        message = exc.message
        if isinstance(exc.kind, jsonschema_rs.ValidationErrorKind.Format):  # a pattern the engine refused
            message += (
                " (patterns run on a linear-time engine: no look-around, no back-references,"
                f" at most {MAX_PATTERN_BYTES // 1024} KB compiled)"
            )
        raise SchemaRefused(f"Not a valid JSON Schema at {_where(exc.instance_path)}: {message}") from None


def _where(path: Any) -> str:
    return "/".join(str(p) for p in path) or "(root)"


def _check_size(schema: dict[str, Any]) -> None:
    # Level by level, without recursion: a document nested too deep for json.dumps is refused here.
    level: list[Any] = [schema]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_SCHEMA_DEPTH:
            raise SchemaRefused(f"The schema is nested more than {MAX_SCHEMA_DEPTH} levels deep.")
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
    size = len(json.dumps(schema, separators=(",", ":")).encode())
    if size > MAX_SCHEMA_BYTES:
        raise SchemaRefused(f"The schema is {size:,} bytes; at most {MAX_SCHEMA_BYTES:,} are allowed.")


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _shown(pointer: str) -> str:
    """A JSON pointer as the admin shows locations: `properties/values/$ref`."""
    return pointer[1:] or "(root)"


def _check_references(schema: dict[str, Any]) -> None:
    """Refuse references that leave the schema, make it recursive or multiply it.

    A `$schema` must name a draft (any other URI would be fetched). A `$ref` must be `#`
    followed by a JSON pointer or an `$anchor` name. `$dynamicRef` and `$recursiveRef` exist only
    for recursion, and an `$id` below the root would start an embedded schema against which
    pointers resolve differently. Following references from the root must never come back to a
    schema being expanded, and must not expand the schema past MAX_EXPANDED_NODES.
    """
    id_keyword = "id" if "draft-04" in str(schema.get("$schema", "")) else "$id"
    anchors: dict[str, str] = {}
    refs: list[tuple[str, str]] = []  # (pointer of the schema holding a $ref, its value)
    definitions: set[str] = set()  # pointers of `$defs`/`definitions`: read only through a $ref
    schemas: set[str] = {""}  # pointers of what is a schema: all a $ref may name
    patterns = 0
    # (pointer, node, whether node is a schema, or a list of them; else a map such as `properties`)
    stack: list[tuple[str, Any, bool]] = [("", schema, True)]
    while stack:
        pointer, node, is_schema = stack.pop()
        if isinstance(node, list):
            for i, value in enumerate(node):
                schemas.add(f"{pointer}/{i}")
                if isinstance(value, dict | list):
                    stack.append((f"{pointer}/{i}", value, True))
            continue
        for key, value in node.items():
            at = f"{pointer}/{_escape(key)}"
            if not is_schema:
                schemas.add(at)
                if isinstance(value, dict | list):
                    stack.append((at, value, True))
            elif key in _DATA_KEYWORDS:
                continue
            elif isinstance(value, dict | list):
                if key == "patternProperties" and isinstance(value, dict):
                    patterns += len(value)
                is_map = key in _SCHEMA_MAPS and isinstance(value, dict)
                stack.append((at, value, not is_map))
                if isinstance(value, dict) and not is_map:
                    schemas.add(at)
                if is_map and key in ("$defs", "definitions"):
                    definitions.add(at)
            elif isinstance(value, str):
                if key == "$schema" and value.rstrip("#") not in DIALECTS:
                    raise SchemaRefused(f"$schema {value!r} at {_shown(at)}: not a JSON Schema draft.")
                if key in ("$dynamicRef", "$recursiveRef"):
                    raise SchemaRefused(f"{key} at {_shown(at)}: recursive references are not allowed.")
                if key == id_keyword and pointer:
                    raise SchemaRefused(f"{key} at {_shown(at)}: only the root may have one (no embedded schemas).")
                if key == "pattern":
                    patterns += 1
                if key == "$anchor":
                    anchors[value] = pointer
                elif key == "$ref":
                    refs.append((pointer, value))

    if patterns > MAX_PATTERNS:
        raise SchemaRefused(f"The schema has {patterns} patterns; at most {MAX_PATTERNS} are allowed.")

    # A schema leads to what every $ref it evaluates names: those inside it, at any depth,
    # except inside its definitions, which count where they are referenced.
    subschemas: dict[str, Any] = {"": schema}
    leads_to: dict[str, list[tuple[str, str]]] = {}
    for pointer, ref in refs:
        target, subschemas[target] = _resolve(schema, ref, anchors, _shown(f"{pointer}/$ref"))
        if target not in schemas:  # e.g. inside an "enum", or a whole "$defs"
            raise SchemaRefused(f"$ref {ref!r} at {_shown(f'{pointer}/$ref')}: names something that is not a schema.")
        holder = pointer
        while True:
            leads_to.setdefault(holder, []).append((target, pointer))
            parent = holder.rpartition("/")[0]
            if not holder or parent in definitions:
                break
            holder = parent
    # Depth first, without recursion (thousands of $refs fit in the size limit), from the root
    # and then from every schema a $ref names, so that a cycle nothing uses is refused too. A
    # schema's expanded size is known once the size of everything it leads to is.
    expanded: dict[str, int] = {}
    for start in subschemas:
        if start in expanded:
            continue
        expanding, path = {start}, [(start, 0)]
        while path:
            node, index = path[-1]
            out = leads_to.get(node, [])
            if index == len(out):
                path.pop()
                expanding.discard(node)
                expanded[node] = _nodes(node, subschemas[node], definitions) + sum(expanded[t] for t, _ in out)
                if expanded[node] > MAX_EXPANDED_NODES:
                    raise SchemaRefused(
                        f"References expand {_shown(node) if node else 'the schema'} to more than"
                        f" {MAX_EXPANDED_NODES:,} keywords and values."
                    )
                continue
            path[-1] = (node, index + 1)
            target, holder = out[index]
            if target in expanding:
                raise SchemaRefused(
                    f"$ref at {_shown(f'{holder}/$ref')}: recursive references are not allowed"
                    f" (it leads back to {_shown(target) if target else 'the root'})."
                )
            if target not in expanded:
                expanding.add(target)
                path.append((target, 0))


def _nodes(pointer: str, document: Any, skipped: set[str]) -> int:
    """Containers and values in a JSON document, except under the pointers skipped."""
    count, stack = 0, [(pointer, document)]
    while stack:
        at, node = stack.pop()
        if at in skipped:
            continue
        count += 1
        if isinstance(node, dict):
            stack.extend((f"{at}/{_escape(k)}", v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((f"{at}/{i}", v) for i, v in enumerate(node))
    return count


def _resolve(schema: dict[str, Any], ref: str, anchors: dict[str, str], at: str) -> tuple[str, Any]:
    """The JSON pointer (escaped, "" for the root) that a `$ref` within the schema names, and what it names."""
    if not ref.startswith("#"):
        raise SchemaRefused(
            f"$ref {ref!r} at {at}: only references within the schema (starting with #) are allowed;"
            " nothing is fetched."
        )
    fragment = unquote(ref[1:])
    if fragment and not fragment.startswith("/"):
        if fragment not in anchors:
            raise SchemaRefused(f"$ref {ref!r} at {at}: no $anchor of that name.")
        fragment = anchors[fragment]
    node: Any = schema
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in fragment.split("/")[1:]]
    for token in tokens:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise SchemaRefused(f"$ref {ref!r} at {at}: names nothing in the schema.")
    return "".join(f"/{_escape(t)}" for t in tokens), node


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
    """Errors of a configuration document against the JSON Schema (the project's own) that describes it."""
    validator = jsonschema.Draft202012Validator(schema)
    messages = []
    for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        messages.append(f"{where}: {error.message}")
    return {field: messages} if messages else {}


@functools.lru_cache(maxsize=512)
def _compiled(text: str) -> jsonschema_rs.Validator | SchemaRefused:
    try:
        return compile_message_schema(json.loads(text))
    except SchemaRefused as exc:
        return exc


class MessageValidator:
    """A device type's message schema, ready for the ingest hot path (~0.3 µs per valid message).

    Compiled validators are shared by schema text: the HTTP endpoint builds a profile per
    request, and every process reloads profiles once a minute. A schema refused here (saved
    before these checks, or written past `clean()`) rejects every message, with the reason.
    """

    def __init__(self, schema: Any) -> None:
        try:
            compiled = _compiled(json.dumps(schema, sort_keys=True, separators=(",", ":")))
        except RecursionError:  # stored past clean(), deeper than json can write
            compiled = SchemaRefused(f"The schema is nested more than {MAX_SCHEMA_DEPTH} levels deep.")
        self._validator = compiled if isinstance(compiled, jsonschema_rs.Validator) else None
        self.refused = str(compiled) if isinstance(compiled, SchemaRefused) else None

    def error(self, document: Any) -> str | None:
        """The first violation as `schema: <path>: <message>`, or None when the document is valid."""
        if self._validator is None:
            return f"schema: the device type's message schema is refused: {self.refused}"
        try:
            if self._validator.is_valid(document):
                return None
            error = next(iter(self._validator.iter_errors(document)), None)
        except ValueError as exc:  # a value with no JSON form (a lone surrogate): not a JSON document
            return f"schema: the message cannot be checked: {str(exc)[:200]}"
        if error is None:
            return None
        return f"schema: {_where(error.instance_path)}: {error.message[:300]}"
