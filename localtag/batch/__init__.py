"""localtag.batch: see docs/architecture.md."""
