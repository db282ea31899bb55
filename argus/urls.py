"""URLs of every site: a tenant's (its admin and the API) and the public one (platform admin, API)."""

from django.contrib import admin
from django.urls import URLPattern, URLResolver, include, path

from argus.urls_api import urlpatterns as api_urlpatterns
from telemetry.admin import deadletters_view

urlpatterns: list[URLPattern | URLResolver] = [
    path("admin/deadletters/", admin.site.admin_view(deadletters_view), name="deadletters"),
    path("admin/", admin.site.urls),
    path("dashboard/", include("dashboard.urls")),
    path("", include(api_urlpatterns)),
]
# Static files are served by WhiteNoise's middleware (argus/settings.py), not by a URL pattern.

handler404 = "argus.views.not_found"
