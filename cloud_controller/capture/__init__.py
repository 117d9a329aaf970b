"""Capture on demand (docs/capture.md): sessions, ingest, retention, export, the API."""
