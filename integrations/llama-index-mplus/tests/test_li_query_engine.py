"""`MPlusQueryEngine`: documents injected once into latent memory, then queried; bad input is explicit."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from llama_index.core import Document
from llama_index.core.base.response.schema import Response
from llama_index.llms.mplus import MPlus, MPlusQueryEngine

from mplus_agents import InvalidInputError

pytestmark = pytest.mark.slow

DOCS = [
    Document(text="The Harbor Museum opens at 9 am and closes at 5 pm. Tickets cost 12 euros."),
    Document(text="The lighthouse on Gull Island was built in 1874 by the engineer Marta Silva."),
    Document(text="The ferry to Gull Island leaves from pier 7 every two hours."),
]


@pytest.fixture(scope="module")
def llm() -> MPlus:
    return MPlus(max_new_tokens=24)


def memory_id() -> str:
    return f"li-docs-{uuid.uuid4().hex}"


def test_answers_from_injected_documents(llm: MPlus) -> None:
    seen: list[tuple[int, int]] = []
    engine = MPlusQueryEngine.from_documents(
        DOCS, llm=llm, memory_id=memory_id(), progress=lambda d, t: seen.append((d, t))
    )
    assert seen and seen[-1][0] == seen[-1][1] == engine.latent_memory.stats().tokens_injected

    response = engine.query("Who built the lighthouse on Gull Island?")
    assert isinstance(response, Response)
    assert "Marta Silva" in str(response)
    assert response.metadata is not None and response.metadata["memory_id"] == engine.memory_id

    later = asyncio.run(engine.aquery("Which pier does the ferry to Gull Island leave from?"))
    assert "7" in str(later)


def test_default_memory_id_names_the_document_set(llm: MPlus) -> None:
    a = MPlusQueryEngine(llm, "unused")  # no injection happens here
    assert a.latent_memory.stats().tokens_injected == 0
    digest_docs = [Document(text=f"Fact number {uuid.uuid4().hex}.")]
    first = MPlusQueryEngine.from_documents(digest_docs, llm=llm)
    assert first.memory_id.startswith("documents-")
    assert MPlusQueryEngine.from_memory(first.memory_id, llm=llm).latent_memory is first.latent_memory


def test_empty_documents_are_refused(llm: MPlus) -> None:
    with pytest.raises(InvalidInputError, match="no documents"):
        MPlusQueryEngine.from_documents([], llm=llm, memory_id=memory_id())
    with pytest.raises(InvalidInputError, match="no text"):
        MPlusQueryEngine.from_documents([Document(text="  \n ")], llm=llm, memory_id=memory_id())
    with pytest.raises(InvalidInputError, match="documents or nodes"):
        MPlusQueryEngine.from_documents(["just a string"], llm=llm, memory_id=memory_id())  # type: ignore[list-item]


def test_query_before_anything_was_injected_is_an_error(llm: MPlus) -> None:
    engine = MPlusQueryEngine.from_memory(memory_id(), llm=llm)
    with pytest.raises(InvalidInputError, match="insert"):
        engine.query("What is in there?")


def test_huge_document_is_split_and_chunked_with_progress(llm: MPlus) -> None:
    engine = MPlusQueryEngine.from_memory(memory_id(), llm=llm)
    engine.latent_memory.max_chars_per_call = 2_000  # a small limit stands in for a huge document
    text = "\n\n".join(f"Record {i}: crate {i} holds {i * 3} lamps and ships on day {i % 28 + 1}." for i in range(120))
    assert len(text) > 3 * 2_000
    seen: list[tuple[int, int]] = []
    tokens = engine.insert([Document(text=text)], progress=lambda d, t: seen.append((d, t)))

    assert len(seen) >= 3  # several 512-token chunks, one report each
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (tokens, tokens)
    assert engine.latent_memory.stats().tokens_injected == tokens


def test_persisted_in_a_store_and_reopened(llm: MPlus, tmp_path: Path) -> None:
    store_mod = pytest.importorskip("mplus_agents.store")
    try:
        memory_store_cls = store_mod.MemoryStore
    except ImportError as e:  # the store extra is not installed
        pytest.skip(str(e))
    ident = memory_id()
    store = memory_store_cls(tmp_path / "store.sqlite3")
    engine = MPlusQueryEngine.from_documents(DOCS, llm=llm, memory_id=ident, store=store)
    tokens = engine.latent_memory.stats().tokens_injected

    reopened_store = memory_store_cls(tmp_path / "store.sqlite3")
    fresh_llm = MPlus(max_new_tokens=24)  # no cached memories: must come from the store
    reopened = MPlusQueryEngine.from_memory(ident, llm=fresh_llm, store=reopened_store)
    assert reopened.latent_memory is not engine.latent_memory
    assert reopened.latent_memory.stats().tokens_injected == tokens
