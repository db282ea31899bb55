"""URLs of the public site (platform admin for tenants, and the API, which routes by credential)."""

from django.contrib import admin
from django.urls import include, path

from argus.urls_api import urlpatterns as api_urlpatterns

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include(api_urlpatterns)),
]
