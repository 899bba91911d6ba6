"""Initial store schema: users, memories, snapshots, shards, snapshot_shards, turns.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mplus_users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_mplus_users"),
        sa.UniqueConstraint("user_id", name="uq_mplus_users_user_id"),
    )
    op.create_table(
        "mplus_memories",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_pk", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=32), nullable=False),
        sa.Column("model_name", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("fingerprint_digest", sa.String(length=64), nullable=False),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("library_version", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("head_snapshot_id", sa.Integer(), nullable=True),
        sa.Column("next_seq", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_pk"], ["mplus_users.id"], name="fk_mplus_memories_user_pk_mplus_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_mplus_memories"),
        sa.UniqueConstraint("key", name="uq_mplus_memories_key"),
        sa.UniqueConstraint("user_pk", name="uq_mplus_memories_user_pk"),
    )
    op.create_table(
        "mplus_snapshots",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("memory_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("turns", sa.Integer(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("injections", sa.Integer(), nullable=False),
        sa.Column("tokens_injected", sa.BigInteger(), nullable=False),
        sa.Column("next_block", sa.BigInteger(), nullable=False),
        sa.Column("since_merge", sa.Integer(), nullable=False),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["memory_id"], ["mplus_memories.id"], name="fk_mplus_snapshots_memory_id_mplus_memories",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_mplus_snapshots"),
    )
    op.create_index("ix_mplus_snapshots_memory_id", "mplus_snapshots", ["memory_id"])
    op.create_table(
        "mplus_shards",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("memory_id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("dtype", sa.String(length=32), nullable=False),
        sa.Column("shape", sa.Text(), nullable=False),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["memory_id"], ["mplus_memories.id"], name="fk_mplus_shards_memory_id_mplus_memories", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_mplus_shards"),
        sa.UniqueConstraint("memory_id", "sha256", name="uq_mplus_shards_memory_id"),
    )
    op.create_index("ix_mplus_shards_memory_id", "mplus_shards", ["memory_id"])
    op.create_table(
        "mplus_snapshot_shards",
        sa.Column("snapshot_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("stop", sa.BigInteger(), nullable=False),
        sa.Column("shard_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["shard_id"], ["mplus_shards.id"], name="fk_mplus_snapshot_shards_shard_id_mplus_shards"
        ),
        sa.ForeignKeyConstraint(
            ["snapshot_id"], ["mplus_snapshots.id"], name="fk_mplus_snapshot_shards_snapshot_id_mplus_snapshots",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("snapshot_id", "kind", "start", name="pk_mplus_snapshot_shards"),
    )
    op.create_index("ix_mplus_snapshot_shards_shard_id", "mplus_snapshot_shards", ["shard_id"])
    op.create_table(
        "mplus_turns",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("memory_id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("batch", sa.Integer(), nullable=False),
        sa.Column("role", sa.Text(), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["memory_id"], ["mplus_memories.id"], name="fk_mplus_turns_memory_id_mplus_memories", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_mplus_turns"),
    )
    op.create_index("ix_mplus_turns_memory_seq", "mplus_turns", ["memory_id", "seq"], unique=True)


def downgrade() -> None:
    op.drop_table("mplus_turns")
    op.drop_table("mplus_snapshot_shards")
    op.drop_table("mplus_shards")
    op.drop_table("mplus_snapshots")
    op.drop_table("mplus_memories")
    op.drop_table("mplus_users")
