"""API errors as `application/problem+json` (RFC 9457): `type`, `title`, `status`, `detail`.

Installed as DRF's EXCEPTION_HANDLER, so every API view answers errors in this one shape.
"""

from __future__ import annotations

import logging
from http.client import responses
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpResponse, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler, set_rollback

from argus.outage import close_broken_connection, is_database_error

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:argus:problem:"


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "Request body is too large."
    default_code = "payload_too_large"


class ServiceUnavailable(exceptions.APIException):
    """A dependency (the pipeline) is down; `wait` becomes the Retry-After header."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "Service temporarily unavailable, try again later."
    default_code = "service_unavailable"

    def __init__(self, detail: str | None = None, code: str | None = None, wait: int | None = None) -> None:
        super().__init__(detail, code)
        self.wait = wait


def database_unavailable() -> ServiceUnavailable:
    """The 503 of a request that needs the database while it is unavailable."""
    return ServiceUnavailable(
        "The database is unavailable; try again later.", "database_unavailable", settings.ARGUS_HTTP_RETRY_AFTER_SECONDS
    )


def problem_response(exc: exceptions.APIException) -> HttpResponse:
    """A problem+json response outside DRF (middleware), with Retry-After where the error has one."""
    code, detail, extra = _code_and_detail(exc)
    status_code = int(exc.status_code)
    body = problem(status_code, code, responses.get(status_code, "Error"), detail, **extra)
    response = JsonResponse(body, status=status_code, content_type=PROBLEM_CONTENT_TYPE)
    wait = getattr(exc, "wait", None)
    if wait:
        response["Retry-After"] = str(int(wait))
    return response


def problem(status_code: int, code: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    """A problem document."""
    return {"type": PROBLEM_TYPE_BASE + code, "title": title, "status": status_code, "detail": detail, **extra}


def _code_and_detail(exc: exceptions.APIException) -> tuple[str, str, dict[str, Any]]:
    detail = exc.detail
    if isinstance(detail, dict | list):
        # Field errors (serializers): keep them machine-readable beside a one-line summary.
        codes = exc.get_codes()
        first = codes if isinstance(codes, str) else exc.default_code
        return str(first), "Invalid request.", {"errors": detail}
    code = getattr(detail, "code", None) or exc.default_code
    return str(code), str(detail), {}


def problem_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler (status, WWW-Authenticate, Retry-After) with the body as a problem document."""
    if isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge()
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    elif is_database_error(exc):
        # The database (the credential lookup, the registry) is down, not the request wrong.
        log.warning("database unavailable in %s: %s", type(context.get("view")).__name__, exc)
        close_broken_connection()
        exc = database_unavailable()
    response = exception_handler(exc, context)
    if response is None:
        # A fault of ours, not of the request: log it with the view, answer in the same shape.
        view = context.get("view")
        log.error("unhandled error in %s", type(view).__name__ if view else "API view", exc_info=exc)
        set_rollback()
        response = Response(status=status.HTTP_500_INTERNAL_SERVER_ERROR)
        response.data = problem(500, "server_error", "Internal Server Error", "An unexpected error occurred.")
    else:
        assert isinstance(exc, exceptions.APIException)
        code, detail, extra = _code_and_detail(exc)
        title = response.status_text or "Error"
        response.data = problem(response.status_code, code, title, detail, **extra)
    response.content_type = PROBLEM_CONTENT_TYPE
    return response
