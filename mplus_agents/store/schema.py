"""The store's tables as a typed SQLAlchemy 2.0 ORM (DESIGN 6).

One user has at most one memory. A memory points at its current snapshot (`head_snapshot_id`); a snapshot
lists the shards that hold its tensors (`snapshot_shards`: which tensor, which token range) and the shards
themselves are content-addressed files (`shards`: sha256, path, dtype, shape), so a shard that did not change
between two snapshots is one row and one file. The ledger (`turns`) holds every injected turn, so a memory
can always be rebuilt from text.

Invariant kept by `MemoryStore`: the head snapshot is exactly the replay of the memory's ledger in `seq`
order. Turns and the snapshot that contains them are committed in one transaction.

Tables change only through Alembic revisions in `migrations/versions` (the ORM here must match the latest
one; a test compares them).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TABLE_PREFIX = "mplus_"
"""Tables are prefixed so the store can share a database with an application's own tables."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = TABLE_PREFIX + "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(256), unique=True)
    """The caller's opaque id, stored as given (validated, never used as a path)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Memory(Base):
    __tablename__ = TABLE_PREFIX + "memories"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey(User.id, ondelete="CASCADE"), unique=True)
    key: Mapped[str] = mapped_column(String(32), unique=True)
    """Random hex name of this memory's shard directory (so no path ever derives from a user id)."""
    model_name: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(Text)
    """JSON of `fingerprint.model_fingerprint` for the model that wrote the head snapshot."""
    fingerprint_digest: Mapped[str] = mapped_column(String(64))
    config: Mapped[str] = mapped_column(Text)
    """`MemoryConfig.to_json()`: the memory keeps its own configuration."""
    library_version: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=0)
    """Incremented by every commit; a writer whose base version is older rebases first."""
    head_snapshot_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """No foreign key on purpose: snapshots point back at memories and a cycle complicates deletes."""
    next_seq: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Snapshot(Base):
    __tablename__ = TABLE_PREFIX + "snapshots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    memory_id: Mapped[int] = mapped_column(ForeignKey(Memory.id, ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    turns: Mapped[int] = mapped_column(Integer)
    """Ledger turns this snapshot contains (all of the memory's turns when it was committed)."""
    last_seq: Mapped[int] = mapped_column(Integer)
    injections: Mapped[int] = mapped_column(Integer)
    tokens_injected: Mapped[int] = mapped_column(BigInteger)
    next_block: Mapped[int] = mapped_column(BigInteger)
    since_merge: Mapped[int] = mapped_column(Integer)
    nbytes: Mapped[int] = mapped_column(BigInteger)
    """Bytes of all tensors of the snapshot (shared shards counted in full)."""


class Shard(Base):
    """One content-addressed safetensors file holding one tensor."""

    __tablename__ = TABLE_PREFIX + "shards"
    __table_args__ = (UniqueConstraint("memory_id", "sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    memory_id: Mapped[int] = mapped_column(ForeignKey(Memory.id, ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    """sha256 of the file's bytes (`sha256sum` of the file prints it)."""
    path: Mapped[str] = mapped_column(Text)
    """Relative to the shard root: `<memory key>/<sha[:2]>/<sha>.safetensors`."""
    dtype: Mapped[str] = mapped_column(String(32))
    shape: Mapped[str] = mapped_column(Text)
    """JSON list."""
    nbytes: Mapped[int] = mapped_column(BigInteger)
    """Size of the file."""


class SnapshotShard(Base):
    """Which shard holds which piece of which tensor of a snapshot.

    Pieces are token ranges `[start, stop)` covering every layer: each injection appends to every layer,
    so slicing by layer would change every file on every save, while old token ranges stay byte-identical.
    """

    __tablename__ = TABLE_PREFIX + "snapshot_shards"

    snapshot_id: Mapped[int] = mapped_column(
        ForeignKey(Snapshot.id, ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(64), primary_key=True)
    """`MemoryState.tensors()` name (`ltm.k`, `pool.age`, `rng_state`) or `pending`."""
    start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    stop: Mapped[int] = mapped_column(BigInteger)
    shard_id: Mapped[int] = mapped_column(ForeignKey(Shard.id), index=True)


class Turn(Base):
    """One injected text: the ledger a memory can be rebuilt from."""

    __tablename__ = TABLE_PREFIX + "turns"
    __table_args__ = (Index("ix_mplus_turns_memory_seq", "memory_id", "seq", unique=True),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    memory_id: Mapped[int] = mapped_column(ForeignKey(Memory.id, ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    """Order of injection within the memory."""
    batch: Mapped[int] = mapped_column(Integer)
    """`seq` of the first turn injected in the same `inject_many` call (replays batch them the same way)."""
    role: Mapped[str | None] = mapped_column(Text, nullable=True)
    text: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


ALL_TABLES = [t.name for t in Base.metadata.sorted_tables]
