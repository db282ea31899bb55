"""The read API of assets and alerts (docs/api.md)."""
