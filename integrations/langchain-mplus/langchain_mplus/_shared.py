"""The one embedded model per process, shared by every `ChatMPlus` and `MPlusChatMessageHistory`.

Loading SmolLM2 costs seconds and ~0.6 GB; LangChain code builds model objects freely (per request, per
chain, in `with_structured_output`), so the default is loaded once, lazily, behind a lock, and reused.
Memories belong to the model that wrote them, so sharing the model is also what lets the chat model read
what the history injected.
"""

from __future__ import annotations

import threading
from typing import Any

from mplus_agents import LatentMemory, MPlusLLM

_lock = threading.Lock()
_default: MPlusLLM | None = None


def default_llm() -> MPlusLLM:
    """The embedded default model, loaded on first use (`MPlusLLM.from_default()`)."""
    global _default
    with _lock:
        if _default is None:
            _default = MPlusLLM.from_default()
        return _default


def user_memory(llm: MPlusLLM, user_id: str, store: Any = None) -> LatentMemory:
    """`user_id`'s latent memory: in this process with `store=None`, else opened from the store."""
    return llm.memory(user_id, store)
