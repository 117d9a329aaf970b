"""Controller side of telemetry and drift: ingest, merged sketches, events, health gates."""
