"""Routes of the assets and alerts API."""

from rest_framework.routers import SimpleRouter

from assets.api.views import AlertViewSet, AssetViewSet

router = SimpleRouter(trailing_slash=True)
router.register("assets", AssetViewSet, basename="asset")
router.register("alerts", AlertViewSet, basename="alert")
urlpatterns = router.urls
