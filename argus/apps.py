from django.apps import AppConfig


class ArgusConfig(AppConfig):
    """Tenancy and the public device registry."""

    name = "argus"
    verbose_name = "Platform"

    def ready(self) -> None:
        # Binds @shared_task to our tenant-aware app in every process that sends tasks.
        # Registers the settings' system checks.
        from argus import (
            celery,  # noqa: F401
            checks,  # noqa: F401
        )
