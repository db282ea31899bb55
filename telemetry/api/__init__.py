"""HTTP ingestion API: POST /api/v1/telemetry (CONTRACT.md §3)."""
