"""Dead letters you can see and replay (issue 11, item 6): a message of a device no tenant has
is dead-lettered by the real bridge; once the device is registered, `deadletters replay` stores
it in that tenant, once, however often the replay runs."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django_tenants.utils import schema_context

from telemetry.deadletters import deadletters_list
from telemetry.models import TelemetryRaw
from tests.conftest import TenantPersona, make_device, make_device_type, tenant_admin_client, unique_id
from tests.pipeline import Pipeline, publisher, wait_for

pytestmark = pytest.mark.integration


def command(*args: str) -> str:
    out = io.StringIO()
    call_command("deadletters", *args, stdout=out)
    return out.getvalue()


def stored(schema: str, logical_id: str) -> list[str]:
    with schema_context(schema):
        rows = TelemetryRaw.objects.filter(logical_identifier=logical_id, status="accepted")
        return sorted(str(m) for m in rows.values_list("msg_id", flat=True))


def test_it_lists_and_replays_a_dead_letter_once_its_device_is_registered(
    pipeline: Pipeline, alpha: TenantPersona, settings: Any
) -> None:
    settings.NATS_URL = pipeline.nats_url
    ghost = unique_id("GHOST")
    with publisher(pipeline.mqtt_url) as device:
        for i in range(2):
            device.send(ghost, {"msg_id": f"early-{i}", "values": {"temperature": 20 + i}})

    def letters_of_ghost() -> list[Any]:
        return [d for d in deadletters_list(reason="unknown_device") if d.device == ghost]

    letters = wait_for(lambda: len(letters_of_ghost()) == 2 and letters_of_ghost(), what="the dead letters")
    assert {letter.reason_code for letter in letters} == {"unknown_device"}
    assert all(letter.size and '"early-' in letter.preview() for letter in letters)
    listing = command("list", "--reason", "unknown_device")
    assert ghost in listing and "unknown_device" in listing

    # Still unknown: nothing moves.
    assert "still unknown" in command("replay", "--reason", "unknown_device")
    assert len(letters_of_ghost()) == 2

    with schema_context(alpha.schema):
        make_device(make_device_type(), logical_identifier=ghost)
    assert "replayed 2 of" in command("replay", "--reason", "unknown_device")
    wait_for(lambda: stored(alpha.schema, ghost) == ["early-0", "early-1"], what="the replayed messages")
    assert letters_of_ghost() == []
    # A second replay finds nothing of them; nothing is stored twice.
    command("replay", "--reason", "unknown_device")
    assert stored(alpha.schema, ghost) == ["early-0", "early-1"]


@pytest.mark.django_db
def test_it_shows_dead_letters_to_the_platform_admin_only(
    nats_server: Any, alpha: TenantPersona, settings: Any
) -> None:
    settings.NATS_URL = nats_server.url
    user = get_user_model()._default_manager.create_superuser(
        username=unique_id("root"), email="root@example.com", password="pw-for-tests"
    )
    platform = Client(HTTP_HOST="platform.unknown")
    platform.force_login(user)
    page = platform.get("/admin/deadletters/")
    assert page.status_code == 200
    assert b"Dead letters" in page.content
    assert tenant_admin_client(alpha).get("/admin/deadletters/").status_code == 404
    assert Client(HTTP_HOST="platform.unknown").get("/admin/deadletters/").status_code == 302  # to the login
