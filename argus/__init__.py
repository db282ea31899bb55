"""Argus: IoT telemetry platform (project package: settings, tenancy, registry, Celery app)."""
