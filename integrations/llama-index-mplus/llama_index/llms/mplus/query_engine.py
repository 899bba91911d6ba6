"""`MPlusQueryEngine`: answer questions from documents held in latent memory instead of retrieved text chunks.

The documents (LlamaIndex documents or nodes) are injected once into a named `LatentMemory`; each query is then
one generation that reads that memory (the short-term pool always, long-term blocks by retrieval) with only
the question in the prompt. There is no embedding model and no vector store; the memory id names the document
set, and with a `MemoryStore` the memory is saved like any user's and can be reopened with `from_memory`.

Behaviour on bad input, by design:
- `from_documents([])`, or documents whose text is all blank: `InvalidInputError` (nothing to remember).
- a document longer than `LatentMemory.max_chars_per_call`: split at paragraph, line or word boundaries and
  injected in pieces; mplus_agents chunks the tokens and reports progress per chunk.
- a query against a memory that holds nothing yet (`from_memory` on a new id): `InvalidInputError` that says
  to call `insert()` or `from_documents()`, instead of a confident answer from an empty memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.base.response.schema import RESPONSE_TYPE, Response, StreamingResponse
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import BaseNode, MetadataMode, QueryBundle
from llama_index.llms.mplus.base import MPlus

from mplus_agents import InvalidInputError, LatentMemory

Progress = Callable[[int, int], None]
"""(tokens injected so far, tokens in total), called after every injected chunk."""

DEFAULT_QUERY_TEMPLATE = "{query}"


class MPlusQueryEngine(BaseQueryEngine):
    """Queries answered by `MPlus` reading the latent memory named `memory_id`."""

    def __init__(
        self,
        llm: MPlus | None = None,
        memory_id: str = "documents",
        *,
        store: Any = None,
        query_template: str = DEFAULT_QUERY_TEMPLATE,
        max_new_tokens: int | None = None,
        streaming: bool = False,
        callback_manager: CallbackManager | None = None,
    ) -> None:
        if "{query}" not in query_template:
            raise InvalidInputError("query_template must contain '{query}'")
        self._llm = llm if llm is not None else MPlus()
        self._memory_id = memory_id
        self._latent = self._llm.latent_memory(memory_id, store)
        self._store = store if store is not None else self._llm.store
        self._query_template = query_template
        self._max_new_tokens = max_new_tokens
        self._streaming = streaming
        super().__init__(callback_manager=callback_manager)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[BaseNode],
        llm: MPlus | None = None,
        memory_id: str | None = None,
        *,
        store: Any = None,
        progress: Progress | None = None,
        show_progress: bool = False,
        **kwargs: Any,
    ) -> MPlusQueryEngine:
        """Inject `documents` into the latent memory `memory_id` and return an engine over it.

        `memory_id` defaults to one derived from the documents' content hashes, so the same set gets the same
        memory. Documents are added to whatever that memory already holds.
        """
        documents = list(documents)
        if not documents:
            raise InvalidInputError("from_documents() got no documents; there is nothing to inject")
        if memory_id is None:
            digest = hashlib.sha256("\n".join(d.hash for d in documents).encode()).hexdigest()[:16]
            memory_id = f"documents-{digest}"
        engine = cls(llm, memory_id, store=store, **kwargs)
        engine.insert(documents, progress=progress, show_progress=show_progress)
        return engine

    @classmethod
    def from_memory(
        cls, memory_id: str, llm: MPlus | None = None, *, store: Any = None, **kwargs: Any
    ) -> MPlusQueryEngine:
        """An engine over a memory injected earlier (in this process, or saved in `store`); injects nothing."""
        return cls(llm, memory_id, store=store, **kwargs)

    def _get_prompt_modules(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ documents

    @property
    def memory_id(self) -> str:
        return self._memory_id

    @property
    def latent_memory(self) -> LatentMemory:
        return self._latent

    def insert(
        self, documents: Sequence[BaseNode], *, progress: Progress | None = None, show_progress: bool = False
    ) -> int:
        """Inject more documents (one atomic update); returns the number of tokens injected."""
        limit = self._latent.max_chars_per_call
        texts: list[str] = []
        for doc in documents:
            if not isinstance(doc, BaseNode):
                raise InvalidInputError(f"expected LlamaIndex documents or nodes, got {type(doc).__name__}")
            text = doc.get_content(metadata_mode=MetadataMode.LLM)
            if text.strip():
                texts.extend(split_text(text, limit))
        if not texts:
            raise InvalidInputError(f"the {len(documents)} document(s) given hold no text to inject")
        callback = progress
        if show_progress:
            callback = _printing_progress(progress)
        report = self._latent.inject_many(texts, progress=callback)
        if show_progress:
            print(file=sys.stderr)
        save = getattr(self._latent, "save", None)
        if self._store is not None and callable(save):
            save()
        return report.tokens

    # ------------------------------------------------------------------ queries

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        stats = self._latent.stats()
        if stats.tokens_injected == 0 and stats.pending_tokens == 0:
            raise InvalidInputError(
                f"latent memory {self._memory_id!r} holds no documents yet: build the engine with "
                "MPlusQueryEngine.from_documents(...) or call insert(documents) before querying"
            )
        if not query_bundle.query_str.strip():
            raise InvalidInputError("the query is empty")
        messages = [
            ChatMessage(role=MessageRole.USER, content=self._query_template.format(query=query_bundle.query_str))
        ]
        kwargs: dict[str, Any] = {"memory": self._latent}
        if self._max_new_tokens is not None:
            kwargs["max_new_tokens"] = self._max_new_tokens
        metadata: dict[str, Any] = {"memory_id": self._memory_id, "memory_tokens": stats.tokens_injected}
        if self._streaming:
            chunks = self._llm.stream_chat(messages, **kwargs)

            def tokens() -> Any:
                for chunk in chunks:
                    if chunk.raw:
                        metadata.update(chunk.raw)
                    if chunk.delta:
                        yield chunk.delta

            return StreamingResponse(response_gen=tokens(), metadata=metadata)
        reply = self._llm.chat(messages, **kwargs)
        metadata.update(reply.raw or {})
        return Response(response=reply.message.content or "", source_nodes=[], metadata=metadata)

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        if self._streaming:
            return self._query(query_bundle)  # the generator is lazy: decoding happens as it is read
        return await asyncio.to_thread(self._query, query_bundle)


def split_text(text: str, limit: int) -> list[str]:
    """Pieces of at most `limit` characters, cut at the last paragraph, line or word break that fits."""
    if limit < 1:
        raise ValueError("limit must be >= 1")
    pieces: list[str] = []
    while len(text) > limit:
        window = text[:limit]
        cut = max(window.rfind("\n\n"), window.rfind("\n"), window.rfind(" "))
        if cut <= limit // 2:
            cut = limit
        piece, text = text[:cut], text[cut:]
        if piece.strip():
            pieces.append(piece)
    if text.strip():
        pieces.append(text)
    return pieces


def _printing_progress(inner: Progress | None) -> Progress:
    def report(done: int, total: int) -> None:
        print(f"\rinjecting documents: {done:,}/{total:,} tokens", end="", file=sys.stderr, flush=True)
        if inner is not None:
            inner(done, total)

    return report
