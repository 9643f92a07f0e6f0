"""localtag.serve: see docs/architecture.md."""
