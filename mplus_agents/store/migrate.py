"""Bring a store database to the latest schema with Alembic, programmatically, when a store is opened.

The caller holds the store-wide "schema" lock, so two processes opening a fresh database do not both try
to create the tables. A database written by a newer mplus_agents (an unknown revision) is refused rather
than touched.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from mplus_agents.store.errors import StoreUnavailableError

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "mplus_alembic_version"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: Engine, writer: Engine) -> None:
    """Run every migration the database lacks, in one transaction on `writer` (SQLite: BEGIN IMMEDIATE)."""
    cfg = alembic_config()
    script = ScriptDirectory.from_config(cfg)
    head = script.get_current_head()
    current = current_revision(engine)
    if current == head:
        return
    if current is not None and current not in {s.revision for s in script.walk_revisions()}:
        raise StoreUnavailableError(
            f"the store database is at schema revision {current!r}, written by a newer mplus_agents; upgrade "
            "mplus_agents to open it"
        )
    with writer.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
