"""localtag.directus: see docs/architecture.md."""
