"""What every view of the read API shares (docs/api.md): who may call it, how lists are paged,
how a time-ordered series is paged, and the bounds on what a client may store.

The read API serves the users of one tenant on that tenant's host. Users, their sessions and
their tokens live in the tenant's schema, so a credential of tenant A means nothing on B's host;
the public site has no tenant data and answers 404 to every read API path.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Any

import django_filters
import orjson
from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import connection
from django.db.models import Model, QuerySet
from django_filters.rest_framework import DjangoFilterBackend
from django_tenants.utils import get_public_schema_name
from rest_framework import exceptions, parsers, serializers
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.generics import GenericAPIView
from rest_framework.pagination import CursorPagination
from rest_framework.permissions import BasePermission, DjangoModelPermissions
from rest_framework.request import Request
from rest_framework.serializers import as_serializer_error
from rest_framework.views import APIView


def on_tenant_site() -> None:
    """404 on the public site, which holds no tenant's data (nor the tables of users' tokens)."""
    if connection.schema_name == get_public_schema_name():  # type: ignore[attr-defined]
        raise exceptions.NotFound("The read API answers on a tenant's host.")


class TenantUsers(BasePermission):
    """An authenticated, active user of the tenant whose host the request came to."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        on_tenant_site()
        user = request.user
        return bool(user and user.is_authenticated and user.is_active)


class ModelPermissions(DjangoModelPermissions):
    """Reads for every user of the tenant; writes for those with the model's add/change permission."""


def requires(permission: str) -> type[BasePermission]:
    """A permission class: the user holds `permission` (`app_label.codename`)."""

    class Requires(BasePermission):
        message = f"This needs the {permission} permission."

        def has_permission(self, request: Request, view: APIView) -> bool:
            return bool(request.user and request.user.has_perm(permission))

    Requires.__name__ = f"Requires_{permission.replace('.', '_')}"
    return Requires


class CursorPage(CursorPagination):
    """Lists paged by an opaque cursor, in the view's `ordering` (a unique key), `limit` bounded."""

    page_size_query_param = "limit"
    cursor_query_param = "cursor"

    def __init__(self) -> None:
        self.page_size = settings.ARGUS_API_PAGE_SIZE
        self.max_page_size = settings.ARGUS_API_MAX_PAGE_SIZE

    def get_ordering(self, request: Request, queryset: QuerySet[Any], view: Any) -> tuple[str, ...]:
        ordering = getattr(view, "ordering", None) or self.ordering
        return (ordering,) if isinstance(ordering, str) else tuple(ordering)


# --- Time-ordered series (raw points, health scores): a cursor is the last time sent ---------


class _UTCDateTimeField(django_filters.fields.IsoDateTimeField):
    """An ISO 8601 time, converted to UTC here: PostgreSQL refuses offsets beyond ±15:59, which
    Python accepts, and a time that leaves years 1 to 9999 in UTC is refused as out of range."""

    def to_python(self, value: Any) -> datetime | None:
        parsed: datetime | None = super().to_python(value)
        if parsed is None:
            return None
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            raise forms.ValidationError("Out of range.", code="overflow") from None


class TimeFilter(django_filters.IsoDateTimeFilter):
    """A list filter on a timestamp (`?last_seen_after=`): ISO 8601, compared in UTC."""

    field_class = _UTCDateTimeField


def time_cursor(time: datetime) -> str:
    """The opaque cursor of the page after a point at `time`."""
    micros = round(time.timestamp() * 1_000_000)
    return base64.urlsafe_b64encode(str(micros).encode()).decode().rstrip("=")


def time_of_cursor(cursor: str) -> datetime:
    """The time a cursor names; a ValidationError for anything this API did not make."""
    try:
        micros = int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii"))
        return datetime.fromtimestamp(micros / 1_000_000, tz=UTC)
    except (ValueError, binascii.Error, OverflowError, OSError, UnicodeDecodeError) as exc:
        raise serializers.ValidationError("Not a cursor of this API.") from exc


def next_page_url(request: Request, last_time: datetime | None, **fixed: datetime) -> str | None:
    """The URL of the next page of a series, or None when this page was its last. `fixed` pins
    parameters whose default moves with the clock (`end`: now), so every page reads one range."""
    if last_time is None:
        return None
    query = request.query_params.copy()
    for name, value in fixed.items():
        query[name] = value.isoformat()
    query["cursor"] = time_cursor(last_time)
    return request.build_absolute_uri(f"{request.path}?{query.urlencode()}")


# --- The OpenAPI document ----------------------------------------------------------------------

_PROBLEMS = {
    "400": "The request is malformed or out of bounds (`errors` says which field).",
    "401": "No credential, or one this tenant does not know.",
    "403": "The user lacks the permission (or a session write lacks its CSRF token).",
    "404": "No such object in this tenant (another tenant's objects are not found either).",
}


def problem_responses(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular hook: document the problem+json answers of every read API operation."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault(
        "Problem",
        {
            "type": "object",
            "properties": {name: {"type": "string"} for name in ("type", "title", "detail")}
            | {"status": {"type": "integer"}, "errors": {"type": "object"}},
            "required": ["type", "title", "status", "detail"],
        },
    )
    content = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, operations in result.get("paths", {}).items():
        if not path.startswith("/api/v1/") or path == "/api/v1/telemetry":
            continue
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for code, description in _PROBLEMS.items():
                responses.setdefault(code, {"description": description, "content": content})
            if path.endswith(("/acknowledge/", "/resolve/")):
                responses.setdefault("409", {"description": "The alert's state does not allow it.", "content": content})
    return result


# --- Bounds on what clients store ---------------------------------------------------------------


class JSONParser(parsers.JSONParser):
    """Request bodies parsed by orjson: strict JSON (no NaN), nesting at most 1,024 deep. The
    standard library's parser raises RecursionError, not ValueError, on deep nesting, which DRF
    would let through as a 500."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return orjson.loads(stream.read())
        except orjson.JSONDecodeError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from exc


def bounded_json(value: Any) -> Any:
    """A JSON object a client stores (metadata): at most ARGUS_API_MAX_METADATA_BYTES encoded, and
    no U+0000, which PostgreSQL's jsonb refuses."""
    if not isinstance(value, dict):
        raise serializers.ValidationError("Expected a JSON object.")
    try:
        encoded = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise serializers.ValidationError("Not storable as JSON.") from exc
    if b"\\u0000" in encoded:
        raise serializers.ValidationError("Strings may not contain U+0000.")
    if len(encoded) > settings.ARGUS_API_MAX_METADATA_BYTES:
        raise serializers.ValidationError(f"At most {settings.ARGUS_API_MAX_METADATA_BYTES} bytes of JSON.")
    return value


class SlugRelation(serializers.SlugRelatedField[Any]):
    """An object named by a field (a type by its name, a gateway by its logical id); a name
    PostgreSQL could not even compare (U+0000) is invalid, not a 500."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str) and "\x00" in data:
            self.fail("invalid")
        return super().to_internal_value(data)


class ModelCleaned(serializers.ModelSerializer[Any]):
    """A model serializer whose writes also pass the model's own full_clean(), so the API refuses
    what the admin refuses (a logical id taken on another tenant, a child without its gateway)."""

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        model: type[Model] = self.Meta.model
        instance = self.instance or model()
        for name, value in attrs.items():
            setattr(instance, name, value)
        try:
            instance.full_clean()
        except DjangoValidationError as exc:
            # Under the API's field names (a model field may be exposed under another name).
            names = {field.source: name for name, field in self.fields.items()}
            errors = {names.get(key, key): value for key, value in as_serializer_error(exc).items()}
            raise serializers.ValidationError(errors) from exc
        return attrs


class TenantAPI(GenericAPIView[Any]):
    """Authentication, permissions, paging and filtering of every read API view (viewsets mix
    this base in first)."""

    authentication_classes = [TokenAuthentication, SessionAuthentication]
    parser_classes = [JSONParser]
    permission_classes = [TenantUsers, ModelPermissions]
    pagination_class = CursorPage
    filter_backends = [DjangoFilterBackend]

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        on_tenant_site()  # before authentication, which reads the tenant's tables
        super().initial(request, *args, **kwargs)
