"""`MPlusChatMessageHistory`: a chat history whose past lives in latent memory, not in the prompt.

`add_messages` injects the turns into the user's `LatentMemory`, which also records them in its ledger
(and, store-backed, saves them). `messages` returns only the last `window` conversation turns of that ledger.
A chain built with `RunnableWithMessageHistory` therefore sends a prompt of constant size however long the
conversation runs, while `ChatMPlus` reads everything older from the same user's memory.

The window is read from the ledger rather than kept in the object because `RunnableWithMessageHistory`
builds a new history object every turn, and because a store-backed ledger survives restarts: two objects
(or two processes) for one user see the same recent turns. System messages are neither injected nor shown
(a chain re-sends its system prompt every turn); empty messages carry nothing and are skipped.

`remember` picks which roles are injected (and so shown): all conversation roles by default. A small model
that parrots its own earlier replies (MEASURED.md) does better remembering only what the user said,
`remember=("user",)`; see examples/langchain_assistant.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage
from mplus_agents import LatentMemory, MPlusLLM

from langchain_mplus._shared import default_llm, user_memory
from langchain_mplus.messages import role_and_text

DEFAULT_WINDOW = 4
CONVERSATION_ROLES = ("user", "assistant", "tool")


class MPlusChatMessageHistory(BaseChatMessageHistory):
    """Per-user history: every turn goes into latent memory; `messages` is the last `window` remembered turns.

    `user_id` names the memory; `llm` defaults to the shared embedded model (the one `ChatMPlus()` reads);
    `store` is a `MemoryStore` (None: in this process); `window` is how many recent turns `messages` returns;
    `remember` is which roles are injected.
    """

    def __init__(
        self,
        user_id: str,
        *,
        llm: MPlusLLM | None = None,
        store: Any = None,
        window: int = DEFAULT_WINDOW,
        remember: Sequence[str] = CONVERSATION_ROLES,
    ) -> None:
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be an int >= 0, got {window!r}")
        unknown = set(remember) - set(CONVERSATION_ROLES)
        if unknown or not remember:
            raise ValueError(f"remember must name some of {CONVERSATION_ROLES}, got {tuple(remember)!r}")
        self.remember = tuple(remember)
        self.llm = llm if llm is not None else default_llm()
        self.store = store
        self.window = window
        self._memory: LatentMemory = user_memory(self.llm, user_id, store)  # validates the id
        self.user_id = user_id

    @property
    def memory(self) -> LatentMemory:
        """The user's latent memory (the object `ChatMPlus` reads for this user in this process)."""
        return self._memory

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        if self.window == 0:
            return []
        turns = [t for t in self._memory.history() if t.role in self.remember]
        return [_to_message(t.role, t.text) for t in turns[-self.window :]]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Inject the turns as one atomic update (a failed injection changes nothing), then save if stored."""
        texts: list[str] = []
        roles: list[str] = []
        for message in messages:
            if isinstance(message, SystemMessage):
                continue
            role, text = role_and_text(message)
            if role not in self.remember or not text.strip():
                continue
            texts.append(text)
            roles.append(role)
        if not texts:
            return
        self._memory.inject_many(texts, roles=roles)
        if self._memory.store is not None:
            self._memory.save()

    def clear(self) -> None:
        """Forget this user's turns: the latent memory is emptied (and, store-backed, saved empty)."""
        self._memory.reset()
        if self._memory.store is not None:
            self._memory.save()

    def __repr__(self) -> str:
        return f"MPlusChatMessageHistory(user_id={self.user_id!r}, window={self.window}, memory={self._memory!r})"


def _to_message(role: str | None, text: str) -> BaseMessage:
    if role == "user":
        return HumanMessage(text)
    if role == "assistant":
        return AIMessage(text)
    return ChatMessage(content=text, role=role or "tool")
