"""One embedded default model per process.

`MPlus()` is cheap to construct many times (LlamaIndex code builds LLM objects freely: settings, agents, copies
by pydantic), but the weights are ~540 MB in fp32, so every `MPlus()` without an explicit model shares one
`MPlusLLM`, loaded on first use.
"""

from __future__ import annotations

import threading

from mplus_agents import MPlusLLM

_lock = threading.Lock()
_default: MPlusLLM | None = None


def default_mplus_llm() -> MPlusLLM:
    """The process-wide embedded model (`MPlusLLM.from_default()`), loaded once."""
    global _default
    if _default is None:
        with _lock:
            if _default is None:
                _default = MPlusLLM.from_default()
    return _default
