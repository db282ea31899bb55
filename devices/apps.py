from django.apps import AppConfig


class DevicesConfig(AppConfig):
    """Device types, devices and their credentials."""

    name = "devices"

    def ready(self) -> None:
        from devices import signals  # noqa: F401 - connects the receivers
