"""Protocol adapters: decode a message's bytes into a document and its readings.

An adapter never raises for bad input from a device: it raises `Rejected` with a reason, and
the caller records the message as a rejected raw row. Shapes are those of docs/ingestion.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from django.conf import settings

from devices.models import logical_identifier_validator


class Rejected(Exception):
    """A message the platform refuses, with the reason stored beside it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class Reading:
    """Metric values of one device (the sender or one of its children) at one time."""

    child_id: str | None  # None: the sending device itself
    time: datetime
    values: dict[str, float]


@dataclass(slots=True)
class ChunkInfo:
    """Where a message sits in a chunked transaction."""

    transaction_id: str
    index: int
    total: int


@dataclass(slots=True)
class Decoded:
    """A decoded message: the document the type's JSON Schema checks, and its readings."""

    document: Any
    msg_id: str | None
    readings: list[Reading] = field(default_factory=list)
    chunk: ChunkInfo | None = None


# A tuple, not `int | float`: that expression builds a new union object at every call, and
# these checks run for every value of every reading.
NUMBER = (int, float)

# A child id becomes a device's logical identifier (an MQTT topic level, a varchar(128) column):
# the same rules as any logical id. fullmatch: the validator's `$` also matches before a final
# newline.
# A plain compiled pattern: the validator's is a lazy proxy, which made every match ~3x slower.
LOGICAL_ID = re.compile(str(logical_identifier_validator.regex.pattern))  # type: ignore[union-attr]
MAX_EXACT_INTEGER = 2**53
# Child ids already found valid: a fleet's ids recur in every message, and a set lookup costs a
# quarter of the match (43 vs 175 ns). Decoding a 2000-child gateway message measured the same
# with the check as without it (best of 30: 5.85 vs 5.95 ms; an endpoint message 3.15 vs 3.31 us).
_valid_ids: set[str] = set()
VALID_IDS_MEMORY = 200_000
LOGICAL_ID_RULES = "letters, digits and . _ : - only, at most 128 characters"


def _no_nul(text: str, what: str) -> str:
    """PostgreSQL text cannot hold U+0000: refuse it here, with a reason, rather than have the
    database refuse the whole batch's COPY."""
    if "\x00" in text:
        raise Rejected(f"{what} contains a NUL character")
    return text


def parse_time(value: Any, received_at: datetime, where: str) -> datetime:
    """A reading time from epoch milliseconds or RFC 3339; the receive time when absent."""
    if value is None:
        return received_at
    if isinstance(value, bool):
        raise Rejected(f"{where}ts must be epoch milliseconds or an RFC 3339 string")
    if isinstance(value, NUMBER):
        if not math.isfinite(value):
            raise Rejected(f"{where}ts is not a finite number")
        try:
            return datetime.fromtimestamp(value / 1000, tz=UTC)
        except (OverflowError, OSError, ValueError):
            raise Rejected(f"{where}ts {value!r} is out of range") from None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise Rejected(f"{where}ts {value[:40]!r} is not RFC 3339") from None
        if parsed.tzinfo is None:
            raise Rejected(f"{where}ts {value[:40]!r} has no time zone offset")
        return parsed.astimezone(UTC)
    raise Rejected(f"{where}ts must be epoch milliseconds or an RFC 3339 string")


def parse_values(values: Any, where: str) -> dict[str, float]:
    """Metric name -> finite float."""
    if not isinstance(values, dict) or not values:
        raise Rejected(f"{where}values must be a non-empty object of metric: number")
    parsed: dict[str, float] = {}
    for key, value in values.items():
        # The name first: the reasons below quote it.
        if len(key) > 64:
            raise Rejected(f"{where}metric name longer than 64 characters")
        if "\x00" in key:
            raise Rejected(f"{where}metric name contains a NUL character")
        if isinstance(value, bool) or not isinstance(value, NUMBER):
            raise Rejected(f"{where}values.{key} is not a number")
        number = float(value)
        if not math.isfinite(number):
            raise Rejected(f"{where}values.{key} is not a finite number")
        parsed[key] = number
    return parsed


def load_json(payload: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity literals."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        if "utf-8" in str(exc).lower() or not _is_utf8(payload):
            raise Rejected("payload is not valid UTF-8") from None
        raise Rejected(f"malformed JSON: {exc}") from None


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def msg_id_of(payload: bytes) -> str | None:
    """The msg_id of a message the adapter refused before it got that far (a bad value, say), if
    the payload is a JSON object with a valid one; else None. For the device's feedback."""
    try:
        document = orjson.loads(payload)
        return _msg_id(document) if isinstance(document, dict) else None
    except (orjson.JSONDecodeError, Rejected):
        return None


def _msg_id(document: dict[str, Any]) -> str | None:
    msg_id = document.get("msg_id")
    if msg_id is None:
        return None
    if type(msg_id) is str and 0 < len(msg_id) <= 200 and "\x00" not in msg_id:
        return msg_id  # the common case, first
    if isinstance(msg_id, float) and msg_id.is_integer():
        msg_id = int(msg_id)  # 5.0 is the integer 5 in JSON; orjson reads it as a float
    if isinstance(msg_id, int) and not isinstance(msg_id, bool):
        # Integers only where every JSON reader agrees on their value (IEEE doubles are exact).
        if abs(msg_id) > MAX_EXACT_INTEGER:
            raise Rejected(f"an integer msg_id must be at most {MAX_EXACT_INTEGER} in magnitude")
        return str(msg_id)
    if not isinstance(msg_id, str) or not msg_id or len(msg_id) > 200:
        raise Rejected("msg_id must be a non-empty string of at most 200 characters")
    return _no_nul(str(msg_id), "msg_id")


def _children_list(document: dict[str, Any], max_children: int) -> list[Any]:
    children = document.get("children")
    if not isinstance(children, list) or not children:
        raise Rejected("children must be a non-empty list")
    if len(children) > max_children:
        raise Rejected(f"{len(children)} children, more than the type's limit of {max_children}")
    return children


def _children(document: dict[str, Any], received_at: datetime, max_children: int) -> list[Reading]:
    children = _children_list(document, max_children)
    base_time = parse_time(document.get("ts"), received_at, "")
    readings: list[Reading] = []
    add = readings.append
    for i, child in enumerate(children):
        # The reason's location is formatted only when there is a reason: building it for every
        # child was a sixth of decoding a 2000-child message.
        if not isinstance(child, dict):
            raise Rejected(f"children[{i}] must be an object")
        child_id = child.get("id")
        if type(child_id) is not str or child_id not in _valid_ids:
            where = f"children[{i}]."
            if not isinstance(child_id, str) or not child_id:
                raise Rejected(f"{where}id must be a non-empty string")
            if not LOGICAL_ID.fullmatch(child_id):
                raise Rejected(f"{where}id {child_id[:40]!r} is not a valid device id ({LOGICAL_ID_RULES})")
            if len(_valid_ids) >= VALID_IDS_MEMORY:
                _valid_ids.clear()
            _valid_ids.add(child_id)
        time = parse_time(child["ts"], received_at, f"children[{i}].") if "ts" in child else base_time
        values = child.get("values")
        parsed = _plain_values(values)
        if parsed is None:
            parsed = parse_values(values, f"children[{i}].")
        add(Reading(child_id, time, parsed))
    return readings


def _plain_values(values: Any) -> dict[str, float] | None:
    """parse_values' result for the common case (short names, finite non-boolean numbers);
    None for anything else, which parse_values then refuses with its reason."""
    if type(values) is not dict or not values:
        return None
    parsed: dict[str, float] = {}
    for key, value in values.items():
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                return None
        elif kind is not int:
            return None
        if len(key) > 64 or "\x00" in key:
            return None
        parsed[key] = float(value)
    return parsed


def _chunk_info(document: dict[str, Any]) -> ChunkInfo:
    transaction_id, index, total = document.get("transaction_id"), document.get("chunk"), document.get("total")
    if not isinstance(transaction_id, str) or not transaction_id or len(transaction_id) > 128:
        raise Rejected("transaction_id must be a non-empty string of at most 128 characters")
    _no_nul(transaction_id, "transaction_id")
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise Rejected("total must be a positive integer")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < total:
        raise Rejected(f"chunk must be an integer in 0..{total - 1}")
    return ChunkInfo(transaction_id=transaction_id, index=index, total=total)


def decode_argus_json(payload: bytes, mode: str, received_at: datetime, max_children: int) -> Decoded:
    """The Argus JSON shapes: endpoint object or list, gateway object, chunk of a gateway message."""
    document = load_json(payload)
    if mode == "endpoint":
        items = document if isinstance(document, list) else [document]
        if not items:
            raise Rejected("empty list of readings")
        msg_id = _msg_id(document) if isinstance(document, dict) else None
        readings = []
        for i, item in enumerate(items):
            where = f"[{i}]." if isinstance(document, list) else ""
            if not isinstance(item, dict):
                raise Rejected(f"{where or 'message '}must be an object with values")
            readings.append(
                Reading(
                    child_id=None,
                    time=parse_time(item.get("ts"), received_at, where),
                    values=parse_values(item.get("values"), where),
                )
            )
        return Decoded(document=document, msg_id=msg_id, readings=readings)
    if not isinstance(document, dict):
        raise Rejected("a gateway message must be a JSON object")
    msg_id = _msg_id(document)
    if mode == "gateway":
        return Decoded(document=document, msg_id=msg_id, readings=_children(document, received_at, max_children))
    if mode == "gateway_chunked":
        # Only what admitting the chunk needs. Its children are parsed once, when the transaction
        # is reassembled (each chunk decoded as the gateway message it is, then the whole checked
        # against the type's schema): parsing them here too doubled the CPU spent per reading.
        chunk = _chunk_info(document)
        _children_list(document, max_children)
        parse_time(document.get("ts"), received_at, "")
        return Decoded(document=document, msg_id=msg_id, chunk=chunk)
    raise Rejected(f"unknown processing mode {mode!r}")


def decode_flat_json(payload: bytes, mode: str, received_at: datetime, max_children: int) -> Decoded:
    """A flat object of metrics, as cheap sensors send it: {"temperature": 21.5, "ts": ...}."""
    if mode != "endpoint":
        raise Rejected("the flat_json adapter only serves endpoint devices")
    document = load_json(payload)
    if not isinstance(document, dict):
        raise Rejected("message must be a JSON object of metric: number")
    values = {k: v for k, v in document.items() if k not in ("ts", "msg_id")}
    reading = Reading(
        child_id=None, time=parse_time(document.get("ts"), received_at, ""), values=parse_values(values, "")
    )
    return Decoded(document=document, msg_id=_msg_id(document), readings=[reading])


Adapter = Callable[[bytes, str, datetime, int], Decoded]

ADAPTERS: dict[str, Adapter] = {
    "argus_json": decode_argus_json,
    "flat_json": decode_flat_json,
}


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """How far before and after its receive time a reading may be stamped."""

    past: timedelta
    future: timedelta

    @classmethod
    def from_settings(cls) -> TimeWindow:
        # Read once per batch, not per message: each settings attribute goes through Django's
        # LazyObject.__getattribute__ in Python (2 % of runingest's profile when read per message).
        past, future = settings.ARGUS_MAX_PAST_SECONDS, settings.ARGUS_MAX_FUTURE_SECONDS
        return cls(timedelta(seconds=past), timedelta(seconds=future))


def check_times(decoded: Decoded, received_at: datetime, window: TimeWindow | None = None) -> None:
    """Refuse readings stamped too far from the time the platform received them."""
    window = window or TimeWindow.from_settings()
    earliest = received_at - window.past
    latest = received_at + window.future
    for reading in decoded.readings:
        if not earliest <= reading.time <= latest:
            raise Rejected(f"timestamp {reading.time.isoformat()} is too far from the receive time")
