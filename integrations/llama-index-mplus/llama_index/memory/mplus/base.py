"""`MPlusMemory`: a LlamaIndex chat memory that keeps a short window in the prompt and the rest in latent memory.

Every turn `put` here is written into the session user's `LatentMemory` (mplus_agents), which `MPlus` reads on
every call; `get` returns only the last few messages. So the prompt stays flat however long the conversation
runs, while old turns stay reachable through the model's key/value memory.

Three choices worth knowing:
- Only the user's messages and tool results are written by default (`write_roles`), not the assistant's
  replies. Measured with the embedded model (a fact said once, eight later exchanges, then the question; 3
  facts x 3 window sizes): with replies written it answered 6/9, each miss repeating its own earlier reply
  ("I'm sorry for any confusion, but as a chatbot..."); without them 9/9. Replies stay in the window and in
  `get_all()`; add "assistant" to `write_roles` to remember them too.
- A user message is written when the turn completes (the next assistant or tool message, or `flush()`), not
  the moment it arrives: the question being answered is then never in the memory it is answered from, and a
  turn is written as one atomic update.
- `get` stamps its messages with the session id (`additional_kwargs["mplus_user_id"]`, copies only), which
  is how `MPlus` knows whose memory to read inside `SimpleChatEngine` or `FunctionAgent`, which only pass
  messages along. Use this memory with `MPlus`; other LLMs would forward that key to their API.
"""

from __future__ import annotations

import threading
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.memory import BaseMemory
from llama_index.llms.mplus import SESSION_KEY, MPlus
from llama_index.llms.mplus.tools import render_call

from mplus_agents import InvalidInputError, LatentMemory

DEFAULT_SESSION = "default"


class MPlusMemory(BaseMemory):
    """Short recent window for the prompt; the whole conversation in the session user's latent memory."""

    session_id: str = Field(default=DEFAULT_SESSION, description="Names the user's persistent latent memory.")
    window: int = Field(default=4, ge=1, description="Messages `get()` returns (the rest lives in latent memory).")
    write_roles: tuple[str, ...] = Field(
        default=("user", "tool"),
        description="Roles whose messages are written to latent memory (see the module docstring for why "
        "assistant replies are not by default).",
    )
    autosave: bool = Field(default=True, description="With a store, save the latent memory after every written turn.")
    store: Any = Field(default=None, exclude=True, description="A mplus_agents MemoryStore, or None (in-process).")

    _llm: MPlus = PrivateAttr()
    _latent: LatentMemory = PrivateAttr()
    _messages: list[ChatMessage] = PrivateAttr(default_factory=list)
    _unwritten: list[ChatMessage] = PrivateAttr(default_factory=list)
    _lock: Any = PrivateAttr(default_factory=threading.RLock)

    def __init__(self, llm: MPlus | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if llm is not None and not isinstance(llm, MPlus):
            raise InvalidInputError(
                f"MPlusMemory needs the MPlus LLM that will read it, got {type(llm).__name__}; other LLMs cannot "
                "read latent memory"
            )
        self._llm = llm if llm is not None else MPlus()
        self._latent = self._llm.latent_memory(self.session_id, self.store)

    @classmethod
    def class_name(cls) -> str:
        return "MPlusMemory"

    @classmethod
    def from_defaults(  # type: ignore[override]
        cls,
        session_id: str = DEFAULT_SESSION,
        llm: MPlus | None = None,
        store: Any = None,
        window: int = 4,
        chat_history: list[ChatMessage] | None = None,
        autosave: bool = True,
        write_roles: tuple[str, ...] | None = None,
        **kwargs: Any,
    ) -> MPlusMemory:
        """`llm` is the `MPlus` that answers (default: `MPlus()`, the shared embedded model).

        `chat_history` is written like `set()`. Token-limit style keywords that LlamaIndex passes to any memory
        class (`token_limit`, `tokenizer_fn`) are accepted and ignored: the window counts messages.
        """
        for ignored in ("token_limit", "tokenizer_fn", "chat_store", "chat_store_key"):
            kwargs.pop(ignored, None)
        if kwargs:
            raise InvalidInputError(f"MPlusMemory.from_defaults() got unexpected arguments: {sorted(kwargs)}")
        extra = {"write_roles": tuple(write_roles)} if write_roles is not None else {}
        memory = cls(llm=llm, session_id=session_id, store=store, window=window, autosave=autosave, **extra)
        if chat_history:
            memory.set(chat_history)
        return memory

    @property
    def latent_memory(self) -> LatentMemory:
        """The session user's `LatentMemory` (shared with the `MPlus` that reads it)."""
        return self._latent

    @property
    def llm(self) -> MPlus:
        return self._llm

    # ------------------------------------------------------------------ BaseMemory API

    def get(self, input: str | None = None, **kwargs: Any) -> list[ChatMessage]:
        """The last `window` messages, stamped with the session id; never starts with an orphaned tool result."""
        with self._lock:
            recent = self._messages[-self.window :]
            while recent and recent[0].role in (MessageRole.TOOL, MessageRole.FUNCTION):
                recent = recent[1:]
            return [self._stamp(m) for m in recent]

    def get_all(self) -> list[ChatMessage]:
        """Every message put through this object since it was created or reset (not the persisted ledger)."""
        with self._lock:
            return list(self._messages)

    def put(self, message: ChatMessage) -> None:
        with self._lock:
            self._messages.append(message)
            self._unwritten.append(message)
            if message.role != MessageRole.USER:
                self._write()

    def put_messages(self, messages: list[ChatMessage]) -> None:
        with self._lock:
            for message in messages:
                self._messages.append(message)
                self._unwritten.append(message)
            if self._unwritten and self._unwritten[-1].role != MessageRole.USER:
                self._write()

    def set(self, messages: list[ChatMessage]) -> None:
        """Replace the conversation. Latent memory cannot be rewritten: when `messages` extends what this
        object already holds only the new tail is written, otherwise all of `messages` is written."""
        with self._lock:
            known = self._messages
            same_prefix = len(messages) >= len(known) and all(
                _key(a) == _key(b) for a, b in zip(known, messages, strict=False)
            )
            new = messages[len(known) :] if same_prefix else list(messages)
            self._messages = list(messages)
            self._unwritten = [m for m in self._unwritten if any(m is n for n in messages)]
            self._unwritten.extend(m for m in new if not any(m is u for u in self._unwritten))
            if self._unwritten and self._unwritten[-1].role != MessageRole.USER:
                self._write()

    def reset(self, latent: bool = False) -> None:
        """Clear the conversation window. The user's long-term latent memory is kept unless `latent=True`:
        a chat engine's reset starts a new conversation, it should not erase months of memory."""
        with self._lock:
            self._messages = []
            self._unwritten = []
            if latent:
                self._latent.reset()
                self._save()

    def flush(self) -> None:
        """Write messages still waiting for their turn to complete (a question that got no answer)."""
        with self._lock:
            self._write()

    # ------------------------------------------------------------------ internals

    def _stamp(self, message: ChatMessage) -> ChatMessage:
        copy = message.model_copy()
        copy.additional_kwargs = {**message.additional_kwargs, SESSION_KEY: self.session_id}
        return copy

    def _write(self) -> None:
        roles = set(self.write_roles)
        items = [(_memory_text(m), _memory_role(m)) for m in self._unwritten if m.role.value in roles]
        items = [(t, r) for t, r in items if t.strip()]
        self._unwritten = []
        if not items:
            return
        self._latent.inject_many([t for t, _ in items], roles=[r for _, r in items])
        if self.autosave:
            self._save()

    def _save(self) -> None:
        save = getattr(self._latent, "save", None)
        if (self.store is not None or self._llm.store is not None) and callable(save):
            save()


def _key(message: ChatMessage) -> tuple[str, str]:
    return message.role.value, _memory_text(message)


def _memory_role(message: ChatMessage) -> str:
    if message.role in (MessageRole.SYSTEM, MessageRole.DEVELOPER):
        return "instructions"
    return message.role.value


def _memory_text(message: ChatMessage) -> str:
    """What of a message goes into latent memory: its text, and tool calls in the format MPlus asks for."""
    parts = [b.text for b in message.blocks if isinstance(b, TextBlock)]
    parts += [render_call(b.tool_name, b.tool_kwargs) for b in message.blocks if isinstance(b, ToolCallBlock)]
    return "\n".join(p for p in parts if p.strip())
