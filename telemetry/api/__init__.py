"""HTTP ingestion API: POST /api/v1/telemetry (docs/ingestion.md)."""
