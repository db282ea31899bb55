"""Static files with DEBUG off (WhiteNoise) and the API's documentation pages (Swagger UI, Redoc)
served from the app's own static files, with no CDN."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
from django.core.management import call_command
from django.test import Client, override_settings

from tests.conftest import TenantPersona

pytestmark = pytest.mark.django_db

# A host no tenant has: the public site (SHOW_PUBLIC_IF_NO_TENANT_FOUND).
PUBLIC_HOST = "platform.unknown"
DOC_PAGES = ["/api/docs/", "/api/redoc/"]
# src="..." and href="..." of the page, and URLs written into its inline script.
ASSET_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
ABSOLUTE_URL = re.compile(r"""(?:https?:)?//[A-Za-z0-9.-]+[^\s"'<>)]*""")


def _body(response: object) -> bytes:
    streaming = getattr(response, "streaming_content", None)
    if streaming is not None:
        return b"".join(streaming)
    return getattr(response, "content", b"")


def _static_urls(html: str) -> list[str]:
    return sorted({url for url in ASSET_URL.findall(html) if url.startswith("/static/")})


def _external_urls(html: str, host: str) -> list[str]:
    """Absolute URLs in the page that point anywhere but the host that served it."""
    # Swagger UI's bundle is not inlined, but its configuration (and Redoc's) is: every URL there
    # must be ours. Namespace URIs of inline SVG name no resource and are not fetched.
    urls = [u for u in ABSOLUTE_URL.findall(html) if not u.startswith(("http://www.w3.org/", "https://www.w3.org/"))]
    return [u for u in urls if urlparse(u if "://" in u else "http:" + u).hostname != host]


@pytest.fixture(params=["tenant", "public"])
def host(request: pytest.FixtureRequest, alpha: TenantPersona) -> str:
    return alpha.host if request.param == "tenant" else PUBLIC_HOST


@override_settings(DEBUG=False)
@pytest.mark.parametrize("page", DOC_PAGES)
def test_it_serves_the_api_docs_from_its_own_static_files(host: str, page: str) -> None:
    client = Client(HTTP_HOST=host)
    response = client.get(page)
    assert response.status_code == 200
    html = response.content.decode()
    assert _external_urls(html, host) == []
    assets = _static_urls(html)
    assert any("drf_spectacular_sidecar/" in url for url in assets), assets
    for url in assets:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert _body(asset)


@override_settings(DEBUG=False)
@pytest.mark.parametrize(
    "path", ["/static/admin/css/base.css", "/static/dashboard/dashboard.js", "/static/dashboard/dashboard.css"]
)
def test_it_serves_admin_and_dashboard_static_files_with_debug_off(host: str, path: str) -> None:
    response = Client(HTTP_HOST=host).get(path)
    assert response.status_code == 200
    assert _body(response)


def test_it_serves_the_collected_files_as_the_image_does(alpha: TenantPersona, tmp_path: Path) -> None:
    """docker/Dockerfile's `collectstatic`, then the production storage: hashed names, compressed
    copies, every file the pages name found in STATIC_ROOT alone (no finders)."""
    production = {
        "STATIC_ROOT": tmp_path,
        "WHITENOISE_USE_FINDERS": False,
        "STORAGES": {
            "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
            "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
        },
    }
    with override_settings(DEBUG=False, **production):
        call_command("collectstatic", "--noinput", verbosity=0)
        assert (tmp_path / "staticfiles.json").exists()
        client = Client(HTTP_HOST=alpha.host)
        for page in DOC_PAGES:
            html = client.get(page).content.decode()
            assets = _static_urls(html)
            assert assets
            for url in assets:
                # Hashed names, so browsers may cache them for good.
                assert re.search(r"\.[0-9a-f]{12}\.", url), url
                response = client.get(url, HTTP_ACCEPT_ENCODING="gzip")
                assert response.status_code == 200, url
                assert "immutable" in response["Cache-Control"]
        login = client.get("/dashboard/login/")
        for url in _static_urls(login.content.decode()):
            assert client.get(url).status_code == 200, url
