from django.apps import AppConfig


class AssetsConfig(AppConfig):
    """Asset types, assets, health scores, threshold rules and alerts."""

    name = "assets"
