"""The package shares LlamaIndex's namespace packages instead of shadowing them."""

from __future__ import annotations

import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_init_in_shared_namespaces() -> None:
    for shared in ("llama_index", "llama_index/llms", "llama_index/memory"):
        assert not (ROOT / shared / "__init__.py").exists(), f"{shared} must stay a namespace package"


def test_imports_next_to_llama_index_core() -> None:
    core = importlib.import_module("llama_index.core")
    llms = importlib.import_module("llama_index.llms.mplus")
    memory = importlib.import_module("llama_index.memory.mplus")
    assert {"MPlus", "MPlusQueryEngine"} <= set(llms.__all__)
    assert memory.__all__ == ["MPlusMemory"]
    assert core.__name__ == "llama_index.core"
    for shared in ("llama_index", "llama_index.llms", "llama_index.memory"):
        assert importlib.import_module(shared).__file__ is None  # still a namespace package, not a shadowing one
