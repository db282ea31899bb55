from django.apps import AppConfig


class ArgusConfig(AppConfig):
    """Tenancy and the public device registry."""

    name = "argus"
    verbose_name = "Platform"
