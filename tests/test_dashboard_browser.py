"""The dashboard in a real browser (Debian's headless Chromium through its chromedriver, driven
by Selenium): a tenant user logs in, a device publishes over MQTT, the reading appears on the
open page without a reload (runbridge, runingest, Redis pub/sub, the ASGI server's event stream),
an alert opens and is acknowledged from the page. A screenshot is kept under
.run/test-artifacts/."""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django_tenants.utils import schema_context
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from assets.models import Alert, Asset, AssetDevice, AssetType, ThresholdRule
from devices.models import Device
from devtools.services import ServerHandle, free_port, port_open
from devtools.supervisor import Child, live_server
from tests.conftest import TenantPersona, make_device, make_device_type, unique_id
from tests.pipeline import ROOT, Celery, Pipeline, publisher, wait_for

pytestmark = pytest.mark.integration

ARTIFACTS = ROOT / ".run" / "test-artifacts"
PASSWORD = "pw-for-the-browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@dataclass
class Site:
    url: str
    port: int
    pipeline: Pipeline


@pytest.fixture
def site(
    broker: ServerHandle, nats_server: ServerHandle, live_db: None, alpha: TenantPersona, tmp_path: Path
) -> Iterator[Site]:
    """runbridge, runingest, a Celery worker and the ASGI server (gunicorn's uvicorn worker) on a free port."""
    pipeline = Pipeline(
        broker,
        nats_server,
        tmp_path,
        extra_env={"ARGUS_LIVE_INTERVAL_SECONDS": "0.2", "ARGUS_HEALTH_DEBOUNCE_SECONDS": "0.2"},
    )
    celery = Celery(pipeline.env, tmp_path)
    port = free_port()
    # DEBUG: the dashboard's own script and stylesheet are served by the app (no CDN).
    asgi = Child(
        "uvicorn",
        live_server(port),
        tmp_path / "uvicorn.log",
        env={**pipeline.env, "DEBUG": "1"},
    )
    try:
        pipeline.start()
        celery.start_worker()
        asgi.start()
        wait_for(lambda: port_open("127.0.0.1", port), timeout=60, what=lambda: f"uvicorn: {asgi.tail()}")
        yield Site(url=f"http://{alpha.host}:{port}", port=port, pipeline=pipeline)
    finally:
        try:
            asgi.stop(20)
        finally:
            try:
                celery.stop()
            finally:
                pipeline.stop()


@pytest.fixture
def browser(alpha: TenantPersona) -> Iterator[WebDriver]:
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1400",
        # The tenant's host name, without touching /etc/hosts.
        f"--host-resolver-rules=MAP {alpha.host} 127.0.0.1",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class Watched:
    device: Device
    asset: Asset
    username: str


def watched(persona: TenantPersona) -> Watched:
    """A user who may act on alerts, and a device feeding an asset with a rule (gt 50)."""
    with schema_context(persona.schema):
        username = unique_id("operator")
        user = get_user_model()._default_manager.create_user(username=username, password=PASSWORD)
        user.user_permissions.set(Permission.objects.filter(codename__in=["view_alert", "change_alert"]))
        device = make_device(make_device_type(message_schema={}))
        asset_type = AssetType.objects.create(
            name=unique_id("tank"),
            metric_definitions=[{"key": "temperature", "min": 0, "max": 50}],
            health_algorithm="threshold",
            health_parameters={},
        )
        asset = Asset.objects.create(asset_type=asset_type, name=unique_id("Tank"))
        AssetDevice.objects.create(asset=asset, device=device)
        ThresholdRule.objects.create(
            name=unique_id("hot"),
            asset_type=asset_type,
            metric="temperature",
            operator="gt",
            threshold=50,
            severity="critical",
        )
    return Watched(device, asset, username)


def until(driver: WebDriver, check: object, timeout: float = 15) -> object:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(check)  # type: ignore[arg-type]


def test_it_shows_readings_and_alerts_live_and_acknowledges_from_the_page(
    site: Site, browser: WebDriver, alpha: TenantPersona
) -> None:
    w = watched(alpha)
    logical_id = w.device.logical_identifier
    with publisher(site.pipeline.mqtt_url) as p:
        # Heard once before the page opens, so the device is on it.
        p.send(logical_id, {"msg_id": "m0", "values": {"temperature": 20.0}})
        _wait_heard(alpha, w.device.pk)

        # The event stream is for signed-in users only (here: the ASGI server itself).
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{site.port}/dashboard/events", timeout=10)
        assert refused.value.code == 404  # no Host of a tenant: the public site
        request = urllib.request.Request(f"http://127.0.0.1:{site.port}/dashboard/events", headers={"Host": alpha.host})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)  # noqa: S310
        assert refused.value.code == 403

        browser.get(f"{site.url}/dashboard/")
        assert "/dashboard/login/" in browser.current_url
        browser.find_element(By.NAME, "username").send_keys(w.username)
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.ID, "login").click()
        until(browser, lambda d: d.find_element(By.ID, "live-status").text == "live")
        row = browser.find_element(By.CSS_SELECTOR, f'#devices tr[data-device="{w.device.pk}"]')

        sent = time.monotonic()
        p.send(logical_id, {"msg_id": "m1", "values": {"temperature": 21.5}})
        until(browser, lambda d: "temperature 21.5" in row.find_element(By.CLASS_NAME, "values").text)
        shown_after = time.monotonic() - sent
        print(f"a reading published over MQTT showed on the open page after {shown_after:.2f} s")
        assert browser.execute_script("return performance.getEntriesByType('navigation').length") == 1  # no reload

        p.send(logical_id, {"msg_id": "m2", "values": {"temperature": 61.0}})
        alert_row = until(
            browser,
            lambda d: next(
                iter(
                    d.find_elements(By.CSS_SELECTOR, f"#alerts tbody tr[data-asset='{w.asset.pk}'][data-status='open']")
                ),
                None,
            ),
            timeout=30,
        )
        assert w.asset.name in alert_row.text  # type: ignore[attr-defined]
        # The asset's health falls by the critical alert's penalty, live too.
        asset_score = browser.find_element(By.CSS_SELECTOR, f'#assets tr[data-asset="{w.asset.pk}"] .score')
        until(browser, lambda d: asset_score.text == "50.00", timeout=30)

        alert_row.find_element(By.CSS_SELECTOR, 'button[data-action="acknowledge"]').click()  # type: ignore[attr-defined]
        until(browser, lambda d: alert_row.find_element(By.CLASS_NAME, "status-cell").text == "acknowledged")  # type: ignore[attr-defined]

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        assert (
            "temperature 61.00" in browser.find_element(By.CSS_SELECTOR, f'#assets tr[data-asset="{w.asset.pk}"]').text
        )

        # The device page: the last hour of one metric from the history API, then live.
        browser.find_element(By.LINK_TEXT, logical_id).click()
        until(browser, lambda d: d.find_element(By.ID, "latest-value").text == "61")
        p.send(logical_id, {"msg_id": "m3", "values": {"temperature": 33.0}})
        until(browser, lambda d: d.find_element(By.ID, "latest-value").text == "33")
        points = browser.find_element(By.CSS_SELECTOR, "#chart polyline").get_attribute("points") or ""
        assert len(points.split()) == 4  # 20, 21.5, 61 from the history API; 33 from the stream
        browser.save_screenshot(str(ARTIFACTS / "dashboard-device.png"))

    with schema_context(alpha.schema):
        alert = Alert.objects.get(asset=w.asset)
        # Acknowledged from the page; resolved by itself once 33 came in.
        assert alert.acknowledged_at is not None
        assert alert.acknowledged_by is not None and alert.acknowledged_by.get_username() == w.username


def _wait_heard(persona: TenantPersona, device_id: int) -> None:
    def heard() -> bool:
        with schema_context(persona.schema):
            return Device.objects.filter(pk=device_id, last_seen__isnull=False).exists()

    wait_for(heard, what="the first reading to be stored", timeout=30)
