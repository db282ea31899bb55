from django.apps import AppConfig


class TelemetryConfig(AppConfig):
    """Raw messages, time series, chunked transactions and the ingest pipeline."""

    name = "telemetry"
