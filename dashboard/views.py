"""The dashboard's pages (sync views: templates) and its event stream (an async view, served by
the ASGI server, `argus/asgi.py`, so an open page holds no worker: docs/dashboard.md)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import orjson
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.handlers.asgi import ASGIRequest
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import get_object_or_404, render
from django_tenants.utils import get_public_schema_name
from redis.exceptions import RedisError

from argus.live import channel
from dashboard.selectors import DEVICES_SHOWN, device_metrics, overview
from devices.models import Device

log = logging.getLogger(__name__)
LOGIN_URL = "dashboard:login"


def tenant_site(request: HttpRequest) -> str:
    """The schema of the tenant whose host this is; 404 on the public site."""
    tenant = getattr(request, "tenant", None)
    schema = getattr(tenant, "schema_name", None) or getattr(connection, "schema_name", None)
    if not schema or schema == get_public_schema_name():
        raise Http404("The dashboard answers on a tenant's host.")
    return str(schema)


@login_required(login_url=LOGIN_URL)
def index(request: HttpRequest) -> HttpResponse:
    tenant_site(request)
    return render(request, "dashboard/index.html", {"overview": overview(), **_live_context()})


@login_required(login_url=LOGIN_URL)
def device(request: HttpRequest, logical_id: str) -> HttpResponse:
    tenant_site(request)
    found = get_object_or_404(Device, logical_identifier=logical_id)
    metrics = device_metrics(found)
    metric = request.GET.get("metric") or (metrics[0] if metrics else "")
    if metric and metric not in metrics:
        raise Http404("No such metric on this device.")
    context = {"device": found, "metrics": metrics, "metric": metric, **_live_context()}
    return render(request, "dashboard/device.html", context)


def _live_context() -> dict[str, object]:
    return {"ping_seconds": settings.ARGUS_LIVE_PING_SECONDS}


async def events(request: HttpRequest) -> HttpResponseBase:
    """Server-sent events: the tenant's live events as they are published, a `ping` event when
    idle. Only under ASGI: a WSGI worker would be held for as long as the page stays open."""
    schema = tenant_site(request)
    if not isinstance(request, ASGIRequest):
        return JsonResponse({"detail": "The event stream is served by the ASGI server."}, status=503)
    user = await request.auser()
    if not user.is_authenticated:
        return JsonResponse({"detail": "Log in first."}, status=403)
    try:
        devices = _devices_of_page(request.GET.get("devices"))
    except ValueError as exc:
        return JsonResponse({"detail": str(exc)}, status=400)
    name = await sync_to_async(channel)(schema)  # it names the database: one query, once
    response = StreamingHttpResponse(_stream(name, devices), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # a reverse proxy must not hold events back
    return response


def _devices_of_page(value: str | None) -> frozenset[str] | None:
    """`?devices=1,2,3`: the devices a page shows (at most DEVICES_SHOWN ids); None: all."""
    if value is None:
        return None
    ids = [part for part in value.split(",") if part]
    if len(ids) > DEVICES_SHOWN or not all(part.isascii() and part.isdigit() and len(part) <= 19 for part in ids):
        raise ValueError(f"devices: at most {DEVICES_SHOWN} device ids, comma-separated.")
    return frozenset(str(int(part)) for part in ids)


def _for_page(data: bytes, devices: frozenset[str] | None) -> bytes:
    """The event as the page needs it: only the devices it shows, when it named them. A tenant's
    event holds up to ARGUS_LIVE_MAX_ITEMS devices; a page shows a few."""
    if devices is None:
        return data
    event = orjson.loads(data)
    for section in ("devices", "presence"):
        if section in event:
            event[section] = {key: value for key, value in event[section].items() if key in devices}
            if not event[section]:
                del event[section]
    return orjson.dumps(event)


async def _stream(name: str, devices: frozenset[str] | None = None) -> AsyncIterator[bytes]:
    client = aioredis.Redis.from_url(str(settings.CACHES["default"]["LOCATION"]))
    pubsub = client.pubsub()
    await pubsub.subscribe(name)
    ping = settings.ARGUS_LIVE_PING_SECONDS
    try:
        # Reconnect after 2 s when the stream breaks (EventSource does it by itself).
        yield b"retry: 2000\nevent: ping\ndata: {}\n\n"
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=ping)
            if message is None:
                yield b"event: ping\ndata: {}\n\n"
                continue
            data = message["data"]
            # One line: the event's JSON never holds a raw newline (orjson escapes them).
            yield b"data: " + _for_page(data if isinstance(data, bytes) else orjson.dumps(data), devices) + b"\n\n"
    finally:
        # The page went away (the server cancels the stream) or Redis did.
        try:
            await pubsub.aclose()
            await client.aclose()
        except (RedisError, OSError):
            log.warning("closing the live stream of %s failed", name, exc_info=True)
