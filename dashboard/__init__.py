"""A tenant's live dashboard: its assets' health, open alerts, devices' latest readings and
rates, updated by server-sent events from argus/live.py's pub/sub (docs/dashboard.md)."""
