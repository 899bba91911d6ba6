"""Alembic migrations of the store schema, run programmatically by `MemoryStore` on open."""
