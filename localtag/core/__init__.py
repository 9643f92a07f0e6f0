"""localtag.core: see docs/architecture.md."""
