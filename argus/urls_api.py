"""API and operational endpoints shared by the public and the tenant sites."""

from django.urls import URLPattern, URLResolver, include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from argus.views import healthz, metrics, readyz
from telemetry.api.views import TelemetryIngestView

urlpatterns: list[URLPattern | URLResolver] = [
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
    path("metrics", metrics, name="metrics"),
    path("api/v1/telemetry", TelemetryIngestView.as_view(), name="telemetry-ingest"),
    # The read API (docs/api.md): one router per app, users of the tenant whose host it is.
    path("api/v1/", include("devices.api.urls")),
    path("api/v1/", include("telemetry.api.urls")),
    path("api/v1/", include("assets.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    # Our template: drf-spectacular's without its Google Fonts links (no file from another host).
    path(
        "api/redoc/",
        SpectacularRedocView.as_view(url_name="schema", template_name="argus/redoc.html"),
        name="api-redoc",
    ),
]
