"""The devtools app: its management commands (`demo`, `simulate`, `bench`, `chunk_bench`)."""

from django.apps import AppConfig


class DevtoolsConfig(AppConfig):
    name = "devtools"
    verbose_name = "Development tools"
