"""Secure defaults (issue 10, item 8): what a production deployment gets without asking.

Each test performs the attack: a forged Host header, a password guessed over and over, a stranger
reading /metrics, a well-known admin password, a password in a log line.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.contrib.auth import get_user_model
from django.test import Client, override_settings
from django_tenants.utils import schema_context

from assets.management.commands.seed_iot import admin_password_default
from bridge.bridge import redacted_url
from devtools.services import ServerHandle
from tests.conftest import TenantPersona
from tests.pipeline import Pipeline, wait_for

ROOT = Path(__file__).resolve().parents[2]
STRANGER = "203.0.113.7"


def production_env(**overrides: str) -> dict[str, str]:
    """The environment of a production process: DEBUG off, a strong key, named hosts."""
    env = {k: v for k, v in os.environ.items() if k not in {"DEBUG", "ARGUS_TESTING", "DJANGO_SETTINGS_MODULE"}}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "argus.settings",
            "DEBUG": "0",
            "ARGUS_TESTING": "0",
            "SECRET_KEY": secrets.token_urlsafe(50),
            "ALLOWED_HOSTS": ".argus.example.com",
            "ARGUS_TRUST_X_FORWARDED_PROTO": "1",
        }
    )
    env.update(overrides)
    return env


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_it_passes_the_deployment_checks_with_a_production_environment() -> None:
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=production_env())
    assert result.returncode == 0, result.stdout + result.stderr


def test_it_refuses_any_host_outside_debug() -> None:
    result = manage("check", env=production_env(ALLOWED_HOSTS="*"))
    assert result.returncode != 0
    assert "ALLOWED_HOSTS=* is refused" in result.stderr


def test_it_answers_only_listed_hosts_outside_debug() -> None:
    result = manage(
        "shell",
        "-c",
        "from django.conf import settings as s; print(s.ALLOWED_HOSTS, s.ARGUS_PLATFORM_ADMIN_HOSTS,"
        " s.SECURE_SSL_REDIRECT, s.SESSION_COOKIE_SECURE, s.SECURE_HSTS_SECONDS)",
        env=production_env(ALLOWED_HOSTS=""),
    )
    assert result.returncode == 0, result.stderr
    expected = "['localhost', '127.0.0.1', '[::1]'] ['127.0.0.1', '[::1]'] True True 31536000"
    assert result.stdout.strip().splitlines()[-1] == expected


@pytest.mark.django_db
@override_settings(ARGUS_PLATFORM_ADMIN_HOSTS=["admin.platform.test"])
def test_it_hides_the_platform_admin_on_other_hosts() -> None:
    user = get_user_model()._default_manager.create_superuser(
        username=f"root-{uuid.uuid4().hex[:6]}", email="root@example.com", password="pw-for-tests"
    )
    stranger = Client(HTTP_HOST="anything.example.net")
    stranger.force_login(user)
    assert stranger.get("/admin/").status_code == 404
    assert stranger.get("/admin/login/").status_code == 404
    operator = Client(HTTP_HOST="admin.platform.test")
    operator.force_login(user)
    assert operator.get("/admin/").status_code == 200


@pytest.mark.django_db
@override_settings(ARGUS_PLATFORM_ADMIN_HOSTS=["admin.platform.test"])
def test_it_keeps_each_tenant_admin_on_its_own_host(alpha: TenantPersona) -> None:
    # The guard is about the public site: a tenant's own admin still answers on its domain.
    assert Client(HTTP_HOST=alpha.host).get("/admin/login/").status_code == 200


def _login(client: Client, username: str, password: str) -> int:
    response = client.post("/admin/login/?next=/admin/", {"username": username, "password": password})
    return response.status_code


@pytest.mark.django_db
@override_settings(AXES_FAILURE_LIMIT=3)
def test_it_locks_out_a_password_guesser_and_only_in_that_tenant(alpha: TenantPersona, beta: TenantPersona) -> None:
    username = f"admin-{uuid.uuid4().hex[:6]}"
    for persona in (alpha, beta):
        with schema_context(persona.schema):
            get_user_model()._default_manager.create_superuser(
                username=username, email=f"{username}@example.com", password="the-right-one"
            )
    guesser = Client(HTTP_HOST=alpha.host, REMOTE_ADDR=STRANGER)
    statuses = [_login(guesser, username, f"guess-{n}") for n in range(3)]
    assert statuses[:2] == [200, 200]  # the form again, with an error
    # Locked out now: even the right password is refused.
    assert _login(guesser, username, "the-right-one") == 429
    # The same user name in another tenant is someone else: not locked.
    beta_guesser = Client(HTTP_HOST=beta.host, REMOTE_ADDR=STRANGER)
    assert _login(beta_guesser, username, "the-right-one") == 302


@pytest.mark.django_db
def test_it_shows_metrics_only_to_loopback_without_a_token() -> None:
    assert Client(REMOTE_ADDR=STRANGER).get("/metrics").status_code == 404
    response = Client(REMOTE_ADDR="127.0.0.1").get("/metrics")
    assert response.status_code == 200
    assert b"python_info" in response.content


@pytest.mark.django_db
@override_settings(ARGUS_METRICS_TOKEN="scrape-me-" + "x" * 20)
def test_it_shows_metrics_only_to_the_bearer_of_the_token() -> None:
    assert Client(REMOTE_ADDR="127.0.0.1").get("/metrics").status_code == 404
    wrong = Client(REMOTE_ADDR=STRANGER, HTTP_AUTHORIZATION="Bearer scrape-me")
    assert wrong.get("/metrics").status_code == 404
    right = Client(REMOTE_ADDR=STRANGER, HTTP_AUTHORIZATION="Bearer scrape-me-" + "x" * 20)
    assert right.get("/metrics").status_code == 200


def test_it_gives_no_well_known_admin_password_outside_debug() -> None:
    with override_settings(DEBUG=False):
        first, second = admin_password_default(), admin_password_default()
    assert first != "argus-demo-admin"
    assert first != second
    assert len(first) >= 20
    with override_settings(DEBUG=True):
        assert admin_password_default() == "argus-demo-admin"


def test_it_redacts_passwords_from_urls_it_logs() -> None:
    from urllib.parse import urlparse

    assert redacted_url(urlparse("mqtts://bridge:s3cret@broker:8883")) == "mqtts://bridge:***@broker:8883"
    assert redacted_url(urlparse("mqtt://broker:1883")) == "mqtt://broker:1883"


def test_it_never_logs_the_mqtt_password(
    broker: ServerHandle, nats_server: ServerHandle, live_db: None, tmp_path: Path
) -> None:
    password = "pw-" + secrets.token_hex(8)
    # The test broker's plain listener is anonymous: it lets the credentials through unchecked.
    running = Pipeline(broker, nats_server, tmp_path, mqtt_url=f"mqtt://bridge:{password}@127.0.0.1:{broker.port}")
    running.start()
    try:
        wait_for(lambda: "mqtt connected" in running.bridge.log(), what="the bridge to connect")
    finally:
        running.stop()
    logged: Any = running.bridge.log_path.read_text(errors="replace")
    assert "bridge:***@" in logged
    assert password not in logged


def test_it_keeps_the_ca_key_out_of_the_web_container() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("web", "bridge", "ingest", "beat"):
        mounts = services[name].get("volumes", [])
        assert [m for m in mounts if m.split(":")[0] == "pki"] == [], f"{name} mounts the CA's volume"
        assert services[name]["environment"]["ARGUS_PKI_DIR"] == "/pki-public"
    assert "pki:/pki" in services["worker"]["volumes"]  # it renews the CRL, which needs the key


@pytest.mark.django_db
def test_it_publishes_only_the_ca_certificate_and_the_crl(tmp_path: Path, settings: Any) -> None:
    from devices import pki
    from devices.services import certificate_crl_renew

    out, public = tmp_path / "pki", tmp_path / "public"
    pki.init_ca(out)
    settings.ARGUS_PKI_PUBLIC_DIR = str(public)
    renewal = certificate_crl_renew(out_dir=out)
    assert renewal is not None and renewal.rebuilt
    assert sorted(p.name for p in public.iterdir()) == ["ca.crt", "crl.pem"]
    assert (public / "crl.pem").read_bytes() == (out / "crl.pem").read_bytes()
    assert b"PRIVATE KEY" not in b"".join(p.read_bytes() for p in public.iterdir())
