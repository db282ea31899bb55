"""Live updates (argus/live.py): notes coalesce into one bounded event per tenant and interval,
reach Redis pub/sub, and the event stream answers only signed-in users of a tenant, under ASGI."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
import redis
from django.conf import settings
from django.test import Client
from django_tenants.utils import schema_context

from argus.cache import database_identity
from argus.live import Coalescer, channel
from dashboard.views import _devices_of_page, _for_page
from tests.conftest import TenantPersona, tenant_admin_client


def test_it_coalesces_any_number_of_notes_into_one_bounded_event_per_tenant(settings: Any) -> None:
    settings.ARGUS_LIVE_MAX_ITEMS = 50
    live = Coalescer()
    for i in range(10_000):
        live.count("alpha", messages=1, readings=3)
        live.update("alpha", "devices", {str(i % 500): {"time": "t", "values": {"v": i}}})
    live.count("beta", messages=2)
    events = live.take()
    assert set(events) == {"alpha", "beta"}
    alpha = events["alpha"]
    assert alpha["counts"] == {"messages": 10_000, "readings": 30_000}
    assert len(alpha["devices"]) == 50
    # The newest notes win: the last 50 devices written, with their last values.
    assert set(alpha["devices"]) == {str(i % 500) for i in range(9_950, 10_000)}
    assert alpha["devices"]["499"]["values"] == {"v": 9_999}
    assert "devices" not in events["beta"]
    assert live.take() == {}  # nothing new, nothing sent


def test_it_publishes_each_tenants_event_on_its_own_channel(db: None) -> None:
    # The channel names the database too: another database's tenant `alpha` is not this one.
    assert channel("alpha") == f"argus:live:{database_identity()}:alpha"
    client = redis.Redis.from_url(str(settings.CACHES["default"]["LOCATION"]))
    pubsub = client.pubsub()
    pubsub.subscribe(channel("alpha"))
    subscribed = pubsub.get_message(timeout=2)
    assert subscribed is not None and subscribed["type"] == "subscribe"
    live = Coalescer()
    live.update(channel("alpha"), "alerts", {"7": {"status": "open"}})
    live.update(channel("beta"), "alerts", {"8": {"status": "open"}})
    assert live.flush() == 2
    message = pubsub.get_message(timeout=2)
    assert message is not None
    assert orjson.loads(message["data"])["alerts"] == {"7": {"status": "open"}}
    time.sleep(0.2)
    assert pubsub.get_message(timeout=0.5) is None  # beta's event went to beta's channel
    pubsub.close()


def test_it_streams_events_only_to_signed_in_users_of_a_tenant_under_asgi(db: None, alpha: TenantPersona) -> None:
    assert Client(HTTP_HOST="unknown.example").get("/dashboard/events").status_code == 404
    # A WSGI worker would be held for as long as the page stays open: refused.
    assert tenant_admin_client(alpha).get("/dashboard/events").status_code == 503


def test_it_asks_a_visitor_to_log_in_and_shows_the_page_to_a_user(db: None, alpha: TenantPersona) -> None:
    response = Client(HTTP_HOST=alpha.host).get("/dashboard/")
    assert response.status_code == 302 and response["Location"].startswith("/dashboard/login/")
    client = tenant_admin_client(alpha)
    page = client.get("/dashboard/")
    assert page.status_code == 200
    assert b'id="live-status"' in page.content
    # Linked from the admin's header.
    with schema_context(alpha.schema):
        assert b'id="dashboard-link"' in client.get("/admin/").content


def test_it_passes_on_to_a_page_only_the_devices_it_shows() -> None:
    event = {"time": 1.0, "counts": {"messages": 3}, "devices": {"1": {"v": 1}, "2": {"v": 2}, "30": {"v": 3}}}
    data = orjson.dumps(event)
    assert _for_page(data, None) == data
    assert orjson.loads(_for_page(data, _devices_of_page("2,30")))["devices"] == {"2": {"v": 2}, "30": {"v": 3}}
    # Nothing of its devices: the counts (the page's rates) still arrive.
    assert orjson.loads(_for_page(data, _devices_of_page("99"))) == {"time": 1.0, "counts": {"messages": 3}}
    assert _devices_of_page("") == frozenset()
    assert _devices_of_page("007,7") == frozenset({"7"})


def test_it_refuses_a_page_asking_for_too_many_or_malformed_devices() -> None:
    for value in (",".join(str(i) for i in range(101)), "1,x", "-1", "1" * 20, "\u0661"):
        with pytest.raises(ValueError):
            _devices_of_page(value)
