"""`MemoryStore`: one persistent latent memory per user, in SQL plus content-addressed shard files (DESIGN 6).

The database (SQLite by default, PostgreSQL for deployments) holds users, memories with the fingerprint of
the model that wrote them, snapshots, shard rows and the ledger of injected turns; tensors live in
safetensors shards (`shards.py`) in a local directory or under any fsspec URL.

Commit protocol (crash safety). A save writes every new shard first (temp file, fsync, rename), then ONE
transaction inserts the snapshot, its shard rows and the new ledger turns and moves the memory's head to it,
then deletes what the previous snapshot no longer shares. A crash before the commit leaves the previous
snapshot as head and only unreferenced files behind (swept by the next save); a crash after it leaves the
new snapshot complete. Every shard is checked against its sha256 when loaded.

Concurrency. Each change to a user happens under that user's lock (`locks.py`): load the head, modify,
commit. `LatentMemory.save()` needs no lock held by the caller: if another process committed since this
memory was loaded, the save replays this memory's unsaved turns on top of the newer snapshot ("rebase")
and commits that, so no turn is ever lost and the head always equals the replay of the ledger. To skip the
replay cost when several writers are expected, hold the lock for the whole exchange::

    with store.session(llm, "alice") as mem:   # lock, load the head
        mem.inject(message, role="user")
    # saved here, then unlocked

Isolation. User ids are validated and only ever compared as values in SQL with bound parameters; shard
paths use a random key per memory, and every shard row must point inside its own memory's directory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sqlalchemy import Engine, create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mplus_agents.config import MemoryConfig
from mplus_agents.errors import MemoryMismatchError
from mplus_agents.memory import LatentMemory, Turn, replay
from mplus_agents.model import validate_user_id
from mplus_agents.state import MemoryState
from mplus_agents.store import fingerprint as fpr
from mplus_agents.store import shards as sh
from mplus_agents.store.errors import (
    CorruptShardError,
    StoreError,
    StoreUnavailableError,
    UnknownTurnError,
    UnknownUserError,
)
from mplus_agents.store.locks import AdvisoryLocks, FileLocks, LockManager
from mplus_agents.store.schema import Memory, Shard, Snapshot, SnapshotShard, User, as_utc, utcnow
from mplus_agents.store.schema import Turn as TurnRow

if TYPE_CHECKING:
    from mplus_agents.model import MPlusLLM

DB_FILE = "store.sqlite3"
SHARD_DIR = "shards"
BUSY_TIMEOUT_MS = 30_000
OPEN_RETRIES = 5
"""A reader that loses a race with a writer (its snapshot's shards deleted under it) reloads the new head."""


def default_home() -> Path:
    """`$MPLUS_HOME`, else `$XDG_DATA_HOME/mplus_agents`, else `~/.local/share/mplus_agents`."""
    home = os.environ.get("MPLUS_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "mplus_agents"


@dataclass
class Binding:
    """What a store-backed `LatentMemory` remembers about where its state came from."""

    store: MemoryStore
    user_id: str
    version: int
    """The memory version its state is based on; 0 when nothing was committed yet."""
    known: dict[str, str] = field(default_factory=dict)
    """Quick hash -> sha256 of the shards of that version, to skip hashing unchanged pieces."""
    cleared: bool = False
    """`reset()` was called: the next save drops the saved history."""
    save_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class SaveReport:
    version: int
    """The memory's version after this commit (increments by one per commit)."""
    turns_committed: int
    shards_written: int
    shards_reused: int
    """Shards of the new snapshot that were already stored (unchanged pieces): not rewritten."""
    bytes_written: int
    rebased: bool
    """Another writer committed first; this memory's unsaved turns were replayed on top of its snapshot."""


@dataclass(frozen=True)
class UserInfo:
    user_id: str
    created_at: datetime
    updated_at: datetime
    turns: int
    tokens_injected: int
    nbytes: int
    model_name: str
    library_version: str


@dataclass
class _Head:
    """The rows a load needs, read in one short transaction."""

    memory_pk: int
    key: str
    version: int
    config: MemoryConfig
    fingerprint: dict[str, Any]
    snapshot: Snapshot | None
    pieces: list[tuple[SnapshotShard, Shard]]
    turns: int


class _HeadMoved(Exception):
    """A shard vanished because a writer replaced the snapshot while we read it."""


class MemoryStore:
    """Per-user latent memories in a database plus shard files.

    `url`: an SQLAlchemy URL (`sqlite:///path.db`, `postgresql://user@host/db`; the psycopg 3 driver is
    used when none is named) or a path to an SQLite file. Default: `$MPLUS_HOME/store.sqlite3`.
    `shards`: a directory or fsspec URL for the tensor files. Default: beside an SQLite database
    (`<db>-shards`), else `$MPLUS_HOME/shards`.
    """

    def __init__(
        self,
        url: str | Path | None = None,
        shards: str | Path | None = None,
        *,
        lock_timeout: float = 120.0,
        shard_bytes: int = sh.DEFAULT_TARGET_BYTES,
        io_threads: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.url = _parse_url(url)
        self.backend = self.url.get_backend_name()
        if self.backend == "sqlite":
            database = self.url.database
            if not database or database == ":memory:" or database.startswith("file:"):
                raise StoreUnavailableError(
                    "MemoryStore needs an SQLite file (sqlite:///path/to/store.sqlite3), not an in-memory database"
                )
        self.shard_bytes = int(shard_bytes)
        self.io_threads = io_threads or max(1, min(4, os.cpu_count() or 1))
        if self.backend == "sqlite":
            db = Path(self.url.database or "")
            if shards is None:
                shards = db.with_name(db.name.removesuffix(".sqlite3") + "-shards")
        elif shards is None:
            shards = default_home() / SHARD_DIR
        self.engine = self._create_engine()
        self._writer = self.engine.execution_options(mplus_immediate=True)
        # Readers see one consistent snapshot of the rows (SQLite transactions already are).
        reader = self.engine
        if self.backend == "postgresql":
            reader = self.engine.execution_options(isolation_level="REPEATABLE READ")
        self._read = sessionmaker(reader, expire_on_commit=False)
        self._write = sessionmaker(self._writer, expire_on_commit=False)
        if self.backend == "sqlite":
            db = Path(self.url.database or "")
            backend: FileLocks | AdvisoryLocks = FileLocks(db.with_name(db.name + ".locks"))
        else:
            backend = AdvisoryLocks(self.engine)
        self._locks = LockManager(backend, lock_timeout)
        try:
            from mplus_agents.store.migrate import upgrade

            with self._locks.hold("schema", "the store schema"):
                upgrade(self.engine, self._writer)
        except (DBAPIError, OSError) as e:
            self.engine.dispose()
            raise StoreUnavailableError(f"cannot open the memory store at {self.describe()}: {_reason(e)}") from e
        self.storage = sh.open_storage(shards, **(storage_options or {}))

    # ------------------------------------------------------------------ setup

    def _create_engine(self) -> Engine:
        if self.backend == "sqlite":
            path = Path(self.url.database or "").expanduser().resolve()
            if not path.parent.is_dir():
                raise StoreUnavailableError(f"cannot open the memory store: directory {path.parent} does not exist")
            self.url = self.url.set(database=str(path))
            engine = create_engine(self.url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_connection: Any, _record: Any) -> None:
                dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (see _on_begin)
                cur = dbapi_connection.cursor()
                cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA secure_delete=ON")  # forgotten text is overwritten, not left in free pages
                cur.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn: Any) -> None:
                # Writers take the write lock up front, so two writers never deadlock upgrading a read lock.
                immediate = conn.get_execution_options().get("mplus_immediate")
                conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

            return engine
        if self.backend == "postgresql":
            try:
                return create_engine(self.url, pool_pre_ping=True)
            except (ArgumentError, NoSuchModuleError, ImportError) as e:
                raise StoreUnavailableError(f"cannot open the memory store at {self.describe()}: {e}") from e
        raise StoreUnavailableError(
            f"unsupported database {self.backend!r} in {self.describe()}: use sqlite:///PATH or postgresql://..."
        )

    def describe(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryStore({self.describe()!r}, shards={self.storage.location!r})"

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Database failures become `StoreUnavailableError` naming the store; our own errors pass through."""
        try:
            yield
        except StoreError:
            raise
        except DBAPIError as e:
            raise StoreUnavailableError(f"{doing} failed on {self.describe()}: {_reason(e)}") from e

    def _user_lock(self, user_id: str) -> contextlib.AbstractContextManager[None]:
        return self._locks.hold(f"user:{user_id}", f"user {user_id!r}")

    # ------------------------------------------------------------------ reading

    def _head(self, user_id: str) -> _Head | None:
        with self._errors("reading the memory"), self._read() as s:
            row = s.execute(
                select(Memory).join(User, Memory.user_pk == User.id).where(User.user_id == user_id)
            ).scalar_one_or_none()
            if row is None:
                return None
            snap = s.get(Snapshot, row.head_snapshot_id) if row.head_snapshot_id is not None else None
            if row.head_snapshot_id is not None and snap is None:
                raise StoreError(f"user {user_id!r}: the head snapshot row is missing")
            pieces: list[tuple[SnapshotShard, Shard]] = []
            if snap is not None:
                pieces = [
                    (a, b)
                    for a, b in s.execute(
                        select(SnapshotShard, Shard)
                        .join(Shard, SnapshotShard.shard_id == Shard.id)
                        .where(SnapshotShard.snapshot_id == snap.id)
                    )
                ]
            turns = s.scalar(select(func.count()).select_from(TurnRow).where(TurnRow.memory_id == row.id)) or 0
            return _Head(
                memory_pk=row.id,
                key=row.key,
                version=row.version,
                config=MemoryConfig.from_json(row.config),
                fingerprint=json.loads(row.fingerprint),
                snapshot=snap,
                pieces=pieces,
                turns=int(turns),
            )

    def _read_piece(
        self,
        head: _Head,
        link: SnapshotShard,
        shard: Shard,
        user_id: str,
        into: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Read one shard, checking that its row belongs to this memory, its sha256, dtype and shape.

        `into` gives the tensor to fill (a token range of a preallocated field); default: a new tensor.
        A missing file raises `_HeadMoved` (the caller decides whether a writer replaced the snapshot).
        """
        expected = sh.relpath(head.key, shard.sha256)
        if shard.memory_id != head.memory_pk or shard.path != expected:
            raise CorruptShardError(
                f"shard {shard.sha256[:12]}... of user {user_id!r} ({link.kind}) points at {shard.path!r}, "
                f"outside this user's memory; refusing to read it. {_rebuild_hint(user_id)}"
            )
        want_shape = json.loads(shard.shape)

        def destination(dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
            if str(dtype).removeprefix("torch.") != shard.dtype:
                raise sh.ShardFormatError(f"holds {dtype}, its row says {shard.dtype}")
            if shape != want_shape:
                raise sh.ShardFormatError(f"holds shape {shape}, its row says {want_shape}")
            return into() if into is not None else torch.empty(shape, dtype=dtype)

        try:
            with self.storage.open_read(shard.path) as f:
                return sh.read_verified(f, shard.sha256, destination)
        except FileNotFoundError:
            raise _HeadMoved(shard.path) from None
        except sh.ChecksumError:
            raise CorruptShardError(
                f"shard {shard.path} of user {user_id!r} ({link.kind}) is corrupted: its sha256 does not match. "
                + _rebuild_hint(user_id)
            ) from None
        except sh.ShardFormatError as e:
            raise CorruptShardError(
                f"shard {shard.path} of user {user_id!r} ({link.kind}) is unreadable: {e}. {_rebuild_hint(user_id)}"
            ) from None

    def _load(self, llm: MPlusLLM, head: _Head, user_id: str) -> tuple[MemoryState, list[int], dict[str, str]]:
        """Read and verify the head snapshot; returns (state fitted to `llm`, pending ids, quick-hash map)."""
        cfg = head.config
        if head.snapshot is None:
            return llm.initial_state(cfg), [], {}
        by_kind: dict[str, list[tuple[SnapshotShard, Shard]]] = {}
        for link, shard in head.pieces:
            by_kind.setdefault(link.kind, []).append((link, shard))
        out: dict[str, torch.Tensor] = {}
        jobs: list[tuple[torch.Tensor | None, int, int, SnapshotShard, Shard]] = []
        for kind, rows in by_kind.items():
            rows.sort(key=lambda r: r[0].start)
            position = 0
            for link, _ in rows:
                if link.start != position or link.stop < link.start:
                    raise CorruptShardError(f"user {user_id!r}: the pieces of {kind} do not tile it")
                position = link.stop
            shapes = [json.loads(s.shape) for _, s in rows]
            dtypes = {s.dtype for _, s in rows}
            if len(dtypes) != 1 or not all(hasattr(torch, d) for d in dtypes):
                raise CorruptShardError(f"user {user_id!r}: the pieces of {kind} disagree on dtype ({dtypes})")
            dtype = getattr(torch, dtypes.pop())
            if len(rows) == 1:
                full = None
            else:
                first = shapes[0]
                full = torch.empty(first[0], position, *first[2:], dtype=dtype)
            for link, shard in rows:
                jobs.append((full, link.start, link.stop, link, shard))
            if full is not None:
                out[kind] = full

        known: dict[str, str] = {}

        def work(job: tuple[torch.Tensor | None, int, int, SnapshotShard, Shard]) -> tuple[str, torch.Tensor, str]:
            full, a, b, link, shard = job
            into = None
            if full is not None:
                if json.loads(shard.shape) != [full.shape[0], b - a, *full.shape[2:]]:
                    raise CorruptShardError(f"user {user_id!r}: piece {link.kind}[{a}:{b}] has shape {shard.shape}")
                into = functools.partial(_token_range, full, a, b)
            t = self._read_piece(head, link, shard, user_id, into)
            q = sh.quick_hash(t)
            return link.kind, t, q or ""

        with ThreadPoolExecutor(self.io_threads) as pool:
            for (kind, t, q), job in zip(pool.map(work, jobs), jobs, strict=True):
                if kind not in out:
                    out[kind] = t
                if q:
                    known[q] = job[4].sha256
        pending = out.pop("pending", torch.zeros(0, dtype=torch.int64))
        snap = head.snapshot
        out["counters"] = torch.tensor(
            [snap.injections, snap.tokens_injected, snap.next_block, snap.since_merge], dtype=torch.int64
        )
        try:
            state = MemoryState.from_tensors(cfg, out)
        except (KeyError, ValueError, TypeError) as e:
            hint = _rebuild_hint(user_id)
            raise CorruptShardError(f"user {user_id!r}: the snapshot is incomplete ({e}). {hint}") from e
        try:
            fitted = state.fitted_to(llm.empty_state(cfg))
        except ValueError as e:
            raise CorruptShardError(f"user {user_id!r}: {e}") from e
        return fitted, [int(i) for i in pending.tolist()], known

    def _saved_turns(self, memory_pk: int) -> list[Turn]:
        with self._errors("reading the history"), self._read() as s:
            rows = s.execute(select(TurnRow).where(TurnRow.memory_id == memory_pk).order_by(TurnRow.seq)).scalars()
            return [_turn(r) for r in rows]

    def _saved_history(self, memory: LatentMemory) -> list[Turn]:
        binding: Binding = memory._binding
        if binding.version == 0 or binding.cleared:
            return []
        head = self._head(binding.user_id)
        return [] if head is None else self._saved_turns(head.memory_pk)

    # ------------------------------------------------------------------ public API

    def open(
        self,
        llm: MPlusLLM,
        user_id: str,
        *,
        config: MemoryConfig | None = None,
        rebuild: bool = False,
        create: bool = True,
    ) -> LatentMemory:
        """Load `user_id`'s memory (a new empty one if the user is unknown and `create`).

        A `config` that differs from the stored one only in read-time fields (`config.READ_FIELDS`: the index,
        the retrieval budget, the selection...) is applied, and saved with the next snapshot; one that would
        store memory differently, or a model whose fingerprint differs from the one that wrote it, raises
        `MemoryMismatchError`. A corrupt or missing
        shard raises `CorruptShardError`. With `rebuild=True` both cases instead rebuild the memory from its
        ledger with this model (and `config`) and commit the result.
        """
        user_id = validate_user_id(user_id)
        for _ in range(OPEN_RETRIES):
            head = self._head(user_id)
            if head is None:
                if not create:
                    raise UnknownUserError(user_id)
                mem = LatentMemory(llm, config or llm.config, user_id=user_id)
                mem._binding = Binding(self, user_id, version=0)
                return mem
            problems = fpr.differences(head.fingerprint, fpr.model_fingerprint(llm))
            if config is not None and not config.same_storage(head.config):
                problems.append("memory config: the requested configuration stores memory differently")
            if problems:
                if rebuild:
                    return self.rebuild(llm, user_id, config=config or head.config)
                raise MemoryMismatchError(
                    f"the memory of user {user_id!r} was made with model {head.fingerprint.get('name')!r} "
                    f"(mplus_agents {head.fingerprint.get('library_version')}) and cannot be read by "
                    f"{llm.name!r} with this configuration ({'; '.join(problems)}). Latent memory only works "
                    f"with the model that wrote it: open it with rebuild=True to rebuild it from its "
                    f"{head.turns} saved turns with this model."
                )
            try:
                state, pending, known = self._load(llm, head, user_id)
            except _HeadMoved as e:
                now = self._head(user_id)
                if now is not None and now.version != head.version:
                    continue
                if rebuild:
                    return self.rebuild(llm, user_id, config=config)
                raise CorruptShardError(
                    f"shard {e.args[0]} of user {user_id!r} is missing. {_rebuild_hint(user_id)}"
                ) from None
            except CorruptShardError:
                if rebuild:
                    return self.rebuild(llm, user_id, config=config)
                raise
            mem = LatentMemory(llm, head.config, state, user_id=user_id)
            if config is not None and config != head.config:
                mem.use_config(config)  # only read-time fields differ (checked above)
            mem.pending = pending
            mem._binding = Binding(self, user_id, version=head.version, known=known)
            return mem
        raise StoreError(f"user {user_id!r} changed {OPEN_RETRIES} times while it was being read; try again")

    @contextlib.contextmanager
    def session(self, llm: MPlusLLM, user_id: str, **open_kwargs: Any) -> Iterator[LatentMemory]:
        """Hold `user_id`'s lock while the caller works on the memory; save when the block ends normally.

        Other writers of this user wait; an exception in the block discards the unsaved turns.
        """
        user_id = validate_user_id(user_id)
        with self._user_lock(user_id):
            mem = self.open(llm, user_id, **open_kwargs)
            yield mem
            mem.save()

    def rebuild(self, llm: MPlusLLM, user_id: str, *, config: MemoryConfig | None = None) -> LatentMemory:
        """Replay the saved ledger with `llm` (and `config`, default: the stored one) into a new snapshot."""
        user_id = validate_user_id(user_id)
        with self._user_lock(user_id):
            head = self._head(user_id)
            if head is None:
                raise UnknownUserError(user_id)
            cfg = config or head.config
            turns = self._saved_turns(head.memory_pk)
            state, pending = replay(llm, cfg, turns)
            version, report = self._commit(
                fpr.model_fingerprint(llm), user_id, head, state, pending, config=cfg, trust=False
            )
            mem = LatentMemory(llm, cfg, state, user_id=user_id)
            mem.pending = pending
            mem._binding = Binding(self, user_id, version=version, known=report["known"])
            return mem

    def users(self) -> list[UserInfo]:
        """Every user with a stored memory, in user id order."""
        with self._errors("listing users"), self._read() as s:
            turn_counts = (
                select(TurnRow.memory_id, func.count().label("n")).group_by(TurnRow.memory_id).subquery()
            )
            rows = s.execute(
                select(User, Memory, Snapshot, turn_counts.c.n)
                .join(Memory, Memory.user_pk == User.id)
                .outerjoin(Snapshot, Snapshot.id == Memory.head_snapshot_id)
                .outerjoin(turn_counts, turn_counts.c.memory_id == Memory.id)
                .order_by(User.user_id)
            )
            return [
                UserInfo(
                    user_id=u.user_id,
                    created_at=as_utc(u.created_at),
                    updated_at=as_utc(m.updated_at),
                    turns=int(n or 0),
                    tokens_injected=int(snap.tokens_injected) if snap else 0,
                    nbytes=int(snap.nbytes) if snap else 0,
                    model_name=m.model_name,
                    library_version=m.library_version,
                )
                for u, m, snap, n in rows
            ]

    def history(self, user_id: str) -> list[Turn]:
        """The saved ledger of `user_id` (no model needed)."""
        user_id = validate_user_id(user_id)
        head = self._head(user_id)
        if head is None:
            raise UnknownUserError(user_id)
        return self._saved_turns(head.memory_pk)

    def forget(self, llm: MPlusLLM, user_id: str, turn_ids: Iterable[int]) -> None:
        """`open(llm, user_id).forget(turn_ids)` without loading the old snapshot."""
        user_id = validate_user_id(user_id)
        head = self._head(user_id)
        if head is None:
            raise UnknownUserError(user_id)
        mem = LatentMemory(llm, head.config, user_id=user_id)
        mem._binding = Binding(self, user_id, version=head.version)
        mem.forget(turn_ids)

    def delete_user(self, user_id: str) -> None:
        """Delete the user's rows, ledger and every shard file of their memory."""
        user_id = validate_user_id(user_id)
        with self._user_lock(user_id), self._errors("deleting a user"):
            with self._write() as s, s.begin():
                user = s.execute(select(User).where(User.user_id == user_id)).scalar_one_or_none()
                if user is None:
                    raise UnknownUserError(user_id)
                memory = s.execute(select(Memory).where(Memory.user_pk == user.id)).scalar_one_or_none()
                key = None
                if memory is not None:
                    key = memory.key
                    _delete_memory_rows(s, memory.id)
                s.delete(user)
            if key is not None:
                self.storage.remove_tree(key)
            self._checkpoint()

    def export(self, user_id: str, path: str | Path) -> Path:
        """Write `user_id`'s saved memory to a new directory (no model needed); see `transfer.py`."""
        from mplus_agents.store.transfer import export_stored

        return export_stored(self, validate_user_id(user_id), Path(path))

    def import_(self, path: str | Path, user_id: str | None = None, *, replace: bool = False) -> str:
        """Import a directory written by `export` as `user_id` (default: the exported id); returns the id."""
        from mplus_agents.store.transfer import import_export

        return import_export(self, Path(path), user_id, replace=replace)

    # ------------------------------------------------------------------ writing

    def _save(self, memory: LatentMemory) -> SaveReport:
        binding: Binding = memory._binding
        llm, user_id = memory.llm, binding.user_id
        with binding.save_lock, self._user_lock(user_id):
            with memory.lock:
                state, pending = memory.state, list(memory.pending)
                unsaved, cleared = list(memory._turns), binding.cleared
            head = self._head(user_id)
            if head is not None:
                self._check_compatible(llm, memory.config, head, user_id)
            rebased = False
            if cleared:
                rebased = head is not None
                state, pending = replay(llm, memory.config, unsaved)
            elif head is not None and head.version != binding.version:
                base, base_pending, _ = self._load_head_for_rebase(llm, head, user_id)
                state, pending = replay(llm, memory.config, unsaved, base, base_pending)
                rebased = True
            version, report = self._commit(
                fpr.model_fingerprint(llm), user_id, head, state, pending, new_turns=unsaved,
                drop=("all" if cleared else None), known=binding.known, config=memory.config,
            )
            with memory.lock:
                done = {id(t) for t in unsaved}
                extra = [t for t in memory._turns if id(t) not in done]
                if binding.cleared and not cleared:
                    pass  # reset() during the save: keep the reset state; the next save drops this history
                else:
                    if rebased:
                        state2, pending2 = replay(llm, memory.config, extra, state, pending) if extra else (
                            state,
                            pending,
                        )
                        memory._state, memory.pending = state2, pending2
                    memory._turns = extra
                    binding.cleared = False
                binding.version = version
                binding.known = report.pop("known")
        return SaveReport(version=version, rebased=rebased, turns_committed=len(unsaved), **report)

    def _load_head_for_rebase(
        self, llm: MPlusLLM, head: _Head, user_id: str
    ) -> tuple[MemoryState, list[int], dict[str, str]]:
        try:
            return self._load(llm, head, user_id)
        except _HeadMoved as e:  # we hold the lock, so nobody can be replacing it
            hint = _rebuild_hint(user_id)
            raise CorruptShardError(f"shard {e.args[0]} of user {user_id!r} is missing. {hint}") from None

    def _check_compatible(self, llm: MPlusLLM, config: MemoryConfig, head: _Head, user_id: str) -> None:
        problems = fpr.differences(head.fingerprint, fpr.model_fingerprint(llm))
        if not config.same_storage(head.config):
            problems.append("memory config differs")
        if problems:
            raise MemoryMismatchError(
                f"user {user_id!r} now has a memory made by another model or configuration "
                f"({'; '.join(problems)}); nothing was saved. Reopen it (rebuild=True to rebuild with this model)."
            )

    def _forget(self, memory: LatentMemory, ids: set[int]) -> None:
        binding: Binding = memory._binding
        llm, user_id = memory.llm, binding.user_id
        with binding.save_lock, self._user_lock(user_id):
            head = self._head(user_id)
            saved = [] if head is None or binding.cleared else self._saved_turns(head.memory_pk)
            unknown = sorted(ids - {t.id for t in saved})
            if unknown:
                raise UnknownTurnError(
                    f"no saved turns {unknown} in the history of user {user_id!r} (unsaved turns get an id when "
                    "saved)"
                )
            if head is not None:
                self._check_compatible(llm, memory.config, head, user_id)
            with memory.lock:
                unsaved = list(memory._turns)
            # Local batch numbers of unsaved turns must not merge with stored ones during the replay.
            keep = [t for t in saved if t.id not in ids] + [_renumber(t) for t in unsaved]
            state, pending = replay(llm, memory.config, keep)
            version, report = self._commit(
                fpr.model_fingerprint(llm), user_id, head, state, pending, new_turns=unsaved, drop=ids,
                config=memory.config,
            )
            with memory.lock:
                done = {id(t) for t in unsaved}
                extra = [t for t in memory._turns if id(t) not in done]
                if extra:
                    state, pending = replay(llm, memory.config, extra, state, pending)
                memory._state, memory.pending, memory._turns = state, pending, extra
                binding.version, binding.known, binding.cleared = version, report["known"], False
        self._checkpoint()

    def _write_pieces(
        self, key: str, pieces: list[sh.Piece], existing: dict[str, int], known: dict[str, str], trust: bool
    ) -> tuple[list[tuple[sh.Piece, str, str, int]], dict[str, Any]]:
        """Write the pieces not stored yet (with `trust=False`, rewrite stored ones too: a rebuild must not
        keep a damaged file because its name matches). Returns [(piece, sha256, quick hash, size)], counters."""
        lock = threading.Lock()
        written: set[str] = set()
        stats = {"shards_written": 0, "shards_reused": 0, "bytes_written": 0}

        def work(piece: sh.Piece) -> tuple[sh.Piece, str, str, int]:
            t = piece.tensor
            q = sh.quick_hash(t) or ""
            digest = known.get(q) if q else None
            if trust and digest is not None and digest in existing:
                with lock:
                    stats["shards_reused"] += 1
                return piece, digest, q, -1
            data = sh.encode(t)
            digest = data.sha256()
            with lock:
                fresh = (not trust or digest not in existing) and digest not in written
                if fresh:
                    written.add(digest)
            if fresh:
                self.storage.write(sh.relpath(key, digest), data)
                with lock:
                    stats["shards_written"] += 1
                    stats["bytes_written"] += data.nbytes
            else:
                with lock:
                    stats["shards_reused"] += 1
            return piece, digest, q, data.nbytes

        with ThreadPoolExecutor(self.io_threads) as pool:
            results = list(pool.map(work, pieces))
        return results, stats

    def _commit(
        self,
        fp: dict[str, Any],
        user_id: str,
        head: _Head | None,
        state: MemoryState,
        pending: list[int],
        *,
        new_turns: Sequence[Turn] = (),
        drop: set[int] | str | None = None,
        known: dict[str, str] | None = None,
        config: MemoryConfig | None = None,
        trust: bool = True,
    ) -> tuple[int, dict[str, Any]]:
        """Write shards, then commit snapshot + turns in one transaction, then delete what is unreferenced.

        `state` must equal the replay of the saved turns (minus `drop`: a set of turn ids, or "all") followed
        by `new_turns`; their `batch` values group them as they were injected. The caller holds the user
        lock. Returns (new version, counters and the quick-hash map of the new snapshot).
        """
        from mplus_agents import __version__

        cfg = config or state.config
        if head is None:
            head = self._reserve(user_id, fp, cfg)
        key = head.key
        with self._errors("reading shard rows"), self._read() as s:
            existing: dict[str, int] = dict(
                s.execute(select(Shard.sha256, Shard.id).where(Shard.memory_id == head.memory_pk)).all()
            )
        pieces = sh.plan(state, pending, self.shard_bytes)
        results, stats = self._write_pieces(key, pieces, existing, known or {}, trust)
        nbytes = sum(p.tensor.numel() * p.tensor.element_size() for p in pieces)
        deleted_paths: list[str] = []
        with self._errors("committing the snapshot"), self._write() as s, s.begin():
            memory = s.get_one(Memory, head.memory_pk)
            if memory.version != head.version:
                raise StoreError(f"user {user_id!r} changed while locked; nothing was saved (lock misuse?)")
            shard_ids = dict(existing)
            new_rows: list[dict[str, Any]] = []
            for piece, digest, _, size in results:
                if digest not in shard_ids and all(r["sha256"] != digest for r in new_rows):
                    t = piece.tensor
                    new_rows.append(
                        {
                            "memory_id": memory.id,
                            "sha256": digest,
                            "path": sh.relpath(key, digest),
                            "dtype": sh.dtype_name(t),
                            "shape": json.dumps(list(t.shape)),
                            "nbytes": size,
                        }
                    )
            if new_rows:
                s.execute(insert(Shard), new_rows)
                shard_ids.update(
                    s.execute(
                        select(Shard.sha256, Shard.id).where(
                            Shard.memory_id == memory.id, Shard.sha256.in_([r["sha256"] for r in new_rows])
                        )
                    ).all()
                )
            if drop == "all":
                s.execute(delete(TurnRow).where(TurnRow.memory_id == memory.id))
            elif isinstance(drop, set) and drop:
                s.execute(delete(TurnRow).where(TurnRow.memory_id == memory.id, TurnRow.id.in_(sorted(drop))))
            seq = memory.next_seq
            batches: dict[int, int] = {}
            turn_rows = []
            for turn in new_turns:
                batch = batches.setdefault(turn.batch, seq)
                turn_rows.append(
                    {"memory_id": memory.id, "seq": seq, "batch": batch, "role": turn.role, "text": turn.text,
                     "tokens": turn.tokens, "created_at": turn.created_at}
                )
                seq += 1
            if turn_rows:
                s.execute(insert(TurnRow), turn_rows)
            n_turns = int(
                s.scalar(select(func.count()).select_from(TurnRow).where(TurnRow.memory_id == memory.id)) or 0
            )
            snap = Snapshot(
                memory_id=memory.id, version=memory.version + 1, created_at=utcnow(), turns=n_turns,
                last_seq=seq - 1, injections=state.injections, tokens_injected=state.tokens_injected,
                next_block=state.next_block, since_merge=state.since_merge, nbytes=nbytes,
            )
            s.add(snap)
            s.flush()
            links = {}
            for piece, digest, _, _ in results:
                links[(piece.kind, piece.start)] = {
                    "snapshot_id": snap.id, "kind": piece.kind, "start": piece.start, "stop": piece.stop,
                    "shard_id": shard_ids[digest],
                }
            s.execute(insert(SnapshotShard), list(links.values()))
            old = select(Snapshot.id).where(Snapshot.memory_id == memory.id, Snapshot.id != snap.id)
            s.execute(delete(SnapshotShard).where(SnapshotShard.snapshot_id.in_(old)))
            s.execute(delete(Snapshot).where(Snapshot.memory_id == memory.id, Snapshot.id != snap.id))
            used = select(SnapshotShard.shard_id).where(SnapshotShard.snapshot_id == snap.id)
            unused = s.execute(
                select(Shard.id, Shard.path).where(Shard.memory_id == memory.id, Shard.id.not_in(used))
            ).all()
            if unused:
                s.execute(delete(Shard).where(Shard.id.in_([i for i, _ in unused])))
                deleted_paths = [p for _, p in unused]
            version = memory.version + 1
            s.execute(
                update(Memory)
                .where(Memory.id == memory.id)
                .values(
                    head_snapshot_id=snap.id, version=version, next_seq=seq, updated_at=utcnow(),
                    model_name=str(fp.get("name")), fingerprint=json.dumps(fp, sort_keys=True),
                    fingerprint_digest=fpr.digest(fp), config=cfg.to_json(), library_version=__version__,
                )
            )
        # After the commit: files nothing refers to any more (the old snapshot's, and leftovers of crashes).
        for path in deleted_paths:
            self.storage.delete(path)
        live = {sh.relpath(key, d) for _, d, _, _ in results}
        for path in self.storage.listdir(key):
            if path not in live:
                self.storage.delete(path)
        stats["known"] = {q: d for _, d, q, _ in results if q}
        return version, stats

    def _reserve(self, user_id: str, fp: dict[str, Any], config: MemoryConfig) -> _Head:
        """Create the user's rows (version 0, no snapshot) before any shard is written.

        The memory's random shard directory is then on record, so files of a save that crashes before its
        commit are swept by the next save instead of being orphaned in a directory nobody knows about.
        """
        from mplus_agents import __version__

        with self._errors("creating the user"), self._write() as s, s.begin():
            if s.execute(select(User.id).where(User.user_id == user_id)).first() is not None:
                raise StoreError(f"user {user_id!r} was created by a writer that did not hold the lock")
            user = User(user_id=user_id, created_at=utcnow())
            s.add(user)
            s.flush()
            s.add(
                Memory(
                    user_pk=user.id, key=uuid.uuid4().hex, model_name=str(fp.get("name")),
                    fingerprint=json.dumps(fp, sort_keys=True), fingerprint_digest=fpr.digest(fp),
                    config=config.to_json(), library_version=__version__, version=0, next_seq=1,
                    created_at=utcnow(), updated_at=utcnow(),
                )
            )
        head = self._head(user_id)
        assert head is not None
        return head

    def _checkpoint(self) -> None:
        """SQLite: fold the WAL into the database so deleted text does not linger in the log."""
        if self.backend != "sqlite":
            return
        with contextlib.suppress(SQLAlchemyError), self.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


# ---------------------------------------------------------------------------------------------- helpers


def _parse_url(url: str | Path | None) -> URL:
    if url is None:
        home = default_home()
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailableError(f"cannot create the data directory {home}: {e}") from e
        return make_url(f"sqlite:///{home / DB_FILE}")
    if isinstance(url, Path) or "://" not in str(url):
        return make_url(f"sqlite:///{Path(url).expanduser().resolve()}")
    try:
        parsed = make_url(str(url))
    except ArgumentError as e:
        raise StoreUnavailableError(f"cannot parse the store URL {url!r}: {e}") from e
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _reason(e: BaseException) -> str:
    orig = getattr(e, "orig", None)
    return str(orig or e).strip().splitlines()[0] if str(orig or e).strip() else type(e).__name__


def _rebuild_hint(user_id: str) -> str:
    return (
        f"The ledger still holds every saved turn: MemoryStore.open(llm, {user_id!r}, rebuild=True) rebuilds "
        "the memory from it."
    )


def _token_range(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return t[:, start:stop]


def _turn(row: TurnRow) -> Turn:
    return Turn(
        id=int(row.id), text=row.text, role=row.role, tokens=int(row.tokens), created_at=as_utc(row.created_at),
        batch=int(row.batch), saved=True,
    )


def _renumber(t: Turn) -> Turn:
    return Turn(t.id, t.text, t.role, t.tokens, t.created_at, -t.batch, t.saved)


def _delete_memory_rows(s: Session, memory_pk: int) -> None:
    snaps = select(Snapshot.id).where(Snapshot.memory_id == memory_pk)
    s.execute(delete(SnapshotShard).where(SnapshotShard.snapshot_id.in_(snaps)))
    s.execute(delete(Snapshot).where(Snapshot.memory_id == memory_pk))
    s.execute(delete(Shard).where(Shard.memory_id == memory_pk))
    s.execute(delete(TurnRow).where(TurnRow.memory_id == memory_pk))
    s.execute(delete(Memory).where(Memory.id == memory_pk))
