"""`LatentMemory`: one user's latent memory, the object users hold and inject into (DESIGN 1)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING


from mplus_agents.config import MemoryConfig
from mplus_agents.errors import InvalidInputError
from mplus_agents.state import MemoryState

if TYPE_CHECKING:
    from mplus_agents.model import MPlusLLM

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
        self._state = state if state is not None else llm.empty_state(self.config)
        if self._state.config != self.config:
            raise ValueError("state.config differs from the memory's config")
        self.user_id = user_id
        self.pending: list[int] = []
        self._lock = threading.RLock()

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
        for text, role in zip(texts, role_list, strict=True):
            ids.extend(self.llm.encode(self.llm.frame.render_item(text, role)))
        with self._lock:
            before = self._state.injections
            pending, state = self.llm.write(self._state, self.pending + ids, progress=progress)
            self._state, self.pending = state, pending
        return InjectReport(tokens=len(ids), chunks=state.injections - before)

    def reset(self) -> None:
        with self._lock:
            self._state = self.llm.empty_state(self.config)
            self.pending = []

    def replace_state(self, state: MemoryState) -> None:
        if state.config != self.config:
            raise ValueError("the new state was made with another memory config")
        with self._lock:
            self._state = state

    def stats(self) -> MemoryStats:
        s = self._state
        size = sum(t.numel() * t.element_size() for t in s.tensors().values())
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
