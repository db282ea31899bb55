"""Routes of a device's readings (under devices/{logical_id}/, beside devices.api.urls)."""

from rest_framework.routers import SimpleRouter

from telemetry.api.readings import DeviceReadingsViewSet

router = SimpleRouter(trailing_slash=True)
router.register("devices", DeviceReadingsViewSet, basename="device-readings")
urlpatterns = router.urls
