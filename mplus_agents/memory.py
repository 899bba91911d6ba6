"""`LatentMemory`: one user's latent memory, the object users hold and inject into (DESIGN 1).

Besides the latent state, a memory keeps a ledger of the texts injected into it (`history()`): latent
state cannot be read back as text, so the ledger is what says exactly what a memory holds, what `forget`
rebuilds from (replaying the other turns into an empty state is deterministic: random drops are seeded by
the state's `rng_state`), and what a memory made by another model is rebuilt from. A memory opened from a
`MemoryStore` keeps only its unsaved turns here; `save()` commits them with the snapshot (DESIGN 6).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mplus_agents.config import READ_FIELDS, MemoryConfig
from mplus_agents.errors import InvalidInputError, MemoryMismatchError
from mplus_agents.state import MemoryState

if TYPE_CHECKING:
    from mplus_agents.model import MPlusLLM
    from mplus_agents.store.store import SaveReport

Progress = Callable[[int, int], None]
"""(tokens done, tokens total), called after every chunk."""


@dataclass(frozen=True)
class MemoryStats:
    pool_tokens: int
    """Short-term tokens per layer (always attended)."""
    pool_capacity: int
    long_term_tokens: int
    """Long-term tokens per layer, merged plus staged (searchable)."""
    staging_tokens: int
    injections: int
    """Chunks injected."""
    tokens_injected: int
    """Text tokens injected."""
    pending_tokens: int
    """`output` source: a tail shorter than `min_chunk`, held until more text arrives (read as prompt text)."""
    bytes: int
    """Bytes held by the memory tensors."""


@dataclass(frozen=True)
class InjectReport:
    tokens: int
    chunks: int


@dataclass(frozen=True)
class Turn:
    """One injected text, as the ledger keeps it."""

    id: int | None
    """Pass it to `forget`. Store-backed memories: the database id, None until saved. In-process: 1, 2, ..."""
    text: str
    role: str | None
    tokens: int
    """Tokens the framed turn took (what it cost in memory)."""
    created_at: datetime
    """When it was injected (UTC)."""
    batch: int
    """Turns injected by one `inject_many` call share a batch, and a replay injects them together again."""
    saved: bool = False
    """Committed to a store."""


def replay(
    llm: MPlusLLM, config: MemoryConfig, turns: Sequence[Turn], state: MemoryState | None = None,
    pending: Sequence[int] = (),
) -> tuple[MemoryState, list[int]]:
    """Inject `turns` in order, batch by batch, into `state` (default: an empty state).

    From an empty state this rebuilds exactly the state the same injections made the first time (drops
    are seeded, chunking depends only on the token stream and its batches). Returns (state, pending ids).
    """
    current = dataclasses.replace(state, config=config) if state is not None else llm.initial_state(config)
    held = list(pending)
    for _, group in itertools.groupby(turns, key=lambda t: t.batch):
        ids: list[int] = []
        for t in group:
            ids.extend(llm.encode(llm.frame.render_item(t.text, t.role)))
        held, current = llm.write(current, held + ids)
    return current, held


class LatentMemory:
    """Thread-safe: concurrent `inject` calls on one memory are serialised; a failed one changes nothing."""

    max_chars_per_call: int = 500_000
    """A larger single text is refused with a clear error; pass it in pieces (the CLI does) or raise this."""

    def __init__(
        self,
        llm: MPlusLLM,
        config: MemoryConfig | None = None,
        state: MemoryState | None = None,
        *,
        user_id: str | None = None,
    ) -> None:
        self.llm = llm
        self.config = config or (state.config if state is not None else llm.config)
        self._state = state if state is not None else llm.initial_state(self.config)
        if self._state.config != self.config:
            raise ValueError("state.config differs from the memory's config")
        self.user_id = user_id
        self.pending: list[int] = []
        self._lock = threading.RLock()
        self._turns: list[Turn] = []
        """In-process: the whole ledger. Store-backed: the turns not saved yet."""
        self._next_id = 1
        self._next_batch = 1
        self._binding: Any = None
        """Set by `MemoryStore` (`mplus_agents.store.store.Binding`) when the memory lives in a store."""

    @property
    def state(self) -> MemoryState:
        return self._state

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def _validate(self, text: object) -> str:
        if not isinstance(text, str):
            raise InvalidInputError(f"inject() takes a str, got {type(text).__name__}")
        if not text.strip():
            raise InvalidInputError("inject() got empty or whitespace-only text; nothing to remember")
        if len(text) > self.max_chars_per_call:
            raise InvalidInputError(
                f"text of {len(text):,} characters exceeds max_chars_per_call={self.max_chars_per_call:,}; "
                "inject it in pieces (inject_many) or raise LatentMemory.max_chars_per_call"
            )
        if self._binding is not None and "\x00" in text:
            raise InvalidInputError("text contains NUL characters, which the memory store cannot keep")
        return text

    def inject(self, text: str, role: str | None = None, *, progress: Progress | None = None) -> InjectReport:
        """Write `text` into latent memory. `role` ("user", "assistant") frames it as a conversation turn."""
        return self.inject_many([text], roles=[role], progress=progress)

    def inject_many(
        self, texts: Iterable[str], roles: Iterable[str | None] | None = None, *, progress: Progress | None = None
    ) -> InjectReport:
        """Inject several texts as one atomic update; short turns are batched into chunks together."""
        texts = [self._validate(t) for t in texts]
        if not texts:
            raise InvalidInputError("inject_many() got no texts")
        role_list = list(roles) if roles is not None else [None] * len(texts)
        if len(role_list) != len(texts):
            raise InvalidInputError("inject_many() needs one role per text")
        for role in role_list:
            if role is not None and (not isinstance(role, str) or not role.strip()):
                raise InvalidInputError(f"role must be a non-empty string or None, got {role!r}")
        ids: list[int] = []
        counts: list[int] = []
        for text, role in zip(texts, role_list, strict=True):
            item = self.llm.encode(self.llm.frame.render_item(text, role))
            ids.extend(item)
            counts.append(len(item))
        with self._lock:
            before = self._state.injections
            pending, state = self.llm.write(self._state, self.pending + ids, progress=progress)
            # Nothing below can fail: state, pending ids and ledger change together or not at all.
            now = datetime.now(UTC)
            batch = self._next_batch
            stored = self._binding is not None
            for text, role, count in zip(texts, role_list, counts, strict=True):
                self._turns.append(
                    Turn(None if stored else self._next_id, text, role, count, now, batch, saved=False)
                )
                self._next_id += 0 if stored else 1
            self._next_batch += 1
            self._state, self.pending = state, pending
        return InjectReport(tokens=len(ids), chunks=state.injections - before)

    def reset(self) -> None:
        """Return to the initial state: empty, or the memory the model's checkpoint ships. Store-backed: the next
        `save()` deletes the saved history too."""
        with self._lock:
            self._state = self.llm.initial_state(self.config)
            self.pending = []
            self._turns = []
            if self._binding is not None:
                self._binding.cleared = True

    def use_config(self, config: MemoryConfig) -> None:
        """Read this memory under `config` from now on (another `ltm_index`, retrieval budget, selection...).

        Only the read-time fields (`config.READ_FIELDS`) may differ; a config that would change what is stored
        raises MemoryMismatchError (rebuild the memory from its ledger for that). A store-backed memory saves
        the new config with its next snapshot.
        """
        if not config.same_storage(self.config):
            raise MemoryMismatchError(
                "this config changes how the memory is stored, not only how it is read; rebuild the memory "
                f"from its turns to use it (fields that may differ: {', '.join(READ_FIELDS)})"
            )
        with self._lock:
            self._state = dataclasses.replace(self._state, config=config)
            self.config = config

    def replace_state(self, state: MemoryState) -> None:
        """Swap in a state made elsewhere. The ledger is not touched, so it no longer describes the state
        (and a store-backed save that must rebase on someone else's newer snapshot replays only the ledger)."""
        if state.config != self.config:
            raise ValueError("the new state was made with another memory config")
        with self._lock:
            self._state = state

    # ------------------------------------------------------------------ ledger and persistence

    @property
    def store(self) -> Any:
        """The `MemoryStore` this memory is saved to, or None for an in-process memory."""
        return None if self._binding is None else self._binding.store

    def history(self) -> list[Turn]:
        """Every turn this memory holds, oldest first: saved ones (store-backed), then unsaved ones."""
        with self._lock:
            unsaved = list(self._turns)
        if self._binding is None:
            return unsaved
        return [*self._binding.store._saved_history(self), *unsaved]

    def save(self) -> SaveReport:
        """Commit the state and the unsaved turns to the store, atomically (see `MemoryStore`)."""
        if self._binding is None:
            from mplus_agents.store.errors import NotStoredError

            raise NotStoredError(
                "this memory lives only in this process; open it with llm.memory(user_id, store=MemoryStore()) "
                "to save it (or write one file with mplus_agents.statefile.save_memory)"
            )
        return self._binding.store._save(self)  # type: ignore[no-any-return]

    def forget(self, turn_ids: Iterable[int]) -> None:
        """Remove turns (ids from `history()`) and rebuild the latent state from the remaining ones.

        The rebuild replays every remaining turn with this model (minutes for a very long history).
        Store-backed: done under the user's lock and committed at once, and older snapshots that still held
        the forgotten turns are deleted with their shards.
        """
        ids = set(_turn_ids(turn_ids))
        if self._binding is not None:
            self._binding.store._forget(self, ids)
            return
        with self._lock:
            known = {t.id for t in self._turns}
            unknown = sorted(ids - known)
            if unknown:
                from mplus_agents.store.errors import UnknownTurnError

                raise UnknownTurnError(f"no turns {unknown} in this memory's history")
            keep = [t for t in self._turns if t.id not in ids]
            state, pending = replay(self.llm, self.config, keep)
            self._state, self.pending, self._turns = state, pending, keep

    def export(self, path: str | Path) -> Path:
        """Write this memory (ledger JSONL, tensor shards, model fingerprint) to a new directory `path`,
        which `MemoryStore.import_(path)` reads back."""
        from mplus_agents.store.transfer import export_memory

        return export_memory(self, Path(path))

    def stats(self) -> MemoryStats:
        s = self._state
        size = s.nbytes()
        return MemoryStats(
            pool_tokens=len(s.pool),
            pool_capacity=self.config.pool_size,
            long_term_tokens=s.long_term_size(),
            staging_tokens=len(s.staging),
            injections=s.injections,
            tokens_injected=s.tokens_injected,
            pending_tokens=len(self.pending),
            bytes=size,
        )

    def __repr__(self) -> str:
        st = self.stats()
        who = f"user={self.user_id!r}, " if self.user_id is not None else ""
        return (
            f"LatentMemory({who}pool={st.pool_tokens}/{st.pool_capacity}, long_term={st.long_term_tokens}, "
            f"tokens_injected={st.tokens_injected})"
        )


def _turn_ids(turn_ids: Iterable[int]) -> list[int]:
    if isinstance(turn_ids, int | str):
        raise InvalidInputError("forget() takes a list of turn ids")
    out = []
    for t in turn_ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise InvalidInputError(f"turn ids are ints (from history()), got {t!r}")
        out.append(t)
    return out
