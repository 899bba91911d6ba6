"""Alembic environment: runs on the connection `MemoryStore` passes in, or on `sqlalchemy.url` from the CLI.

Developers can also point the stock `alembic` command at a scratch database (set `sqlalchemy.url`)
to write a new revision; `MemoryStore(url)` migrates by itself.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from mplus_agents.store.schema import Base

VERSION_TABLE = "mplus_alembic_version"

config = context.config
connection = config.attributes.get("connection")


def run(conn: object) -> None:
    context.configure(
        connection=conn,  # type: ignore[arg-type]
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        run(conn)
