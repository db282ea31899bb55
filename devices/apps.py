from django.apps import AppConfig


class DevicesConfig(AppConfig):
    """Device types, devices and their credentials."""

    name = "devices"
