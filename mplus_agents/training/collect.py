"""Run the frozen model once over the training text and keep what the retriever loss needs (SPEC 5.1-5.2).

M+ detaches the hidden states its retriever reads, so the retriever loss never reaches the model. That makes
co-training cheap on a CPU: the model runs once, under `no_grad`, through a real memory (the user's
`MemoryConfig`, with its chunking, drops and merges), and this module records

- the key features of every memory token when it is written (`kv_features(k, v)` for the `input` source,
  the layer-normalised memory vector for the `output` source), indexed by a global token id;
- for every query: the layer-normalised hidden states of the query tokens at each trained layer, computed
  exactly as the read path computes them (a pass over [sink, pool, question frame]), the ids of every token
  in memory at that moment, and which of them came from the relevant segments (the labels).

A token's global id needs no bookkeeping beside the memory: ages count injected tokens since a token was
written, so `id = tokens written so far - 1 - age` in every layer, through drops, merges and evictions. The
labels are therefore exactly the surviving tokens of the relevant chunks (tests check this).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mplus_agents.chunking import split_chunks
from mplus_agents.config import MemoryConfig
from mplus_agents.engine import _split_pool
from mplus_agents.hf.hooks import layer_hooks
from mplus_agents.model import MPlusLLM
from mplus_agents.retriever import kv_features
from mplus_agents.state import MemoryState
from mplus_agents.training.data import Document, interleave

NEXT = 0
QUESTION = 1


@dataclass(frozen=True)
class CollectOptions:
    layers: tuple[int, ...]
    """Decoder layers whose projectors are trained."""
    seed: int = 0
    next_prob: float = 0.15
    """Chance that a segment (with a predecessor in its document) becomes a next-sentence query."""
    context_segments: int = 2
    """Related context of a next-sentence query: this many preceding segments of its document."""
    question_delay: tuple[int, int] = (1500, 6000)
    """A question is asked once this many more memory tokens (uniform in the range) have been written."""
    max_query_chars: int = 240
    role: str | None = "user"
    """How segments are framed when injected (`user`: chat turns, as the recall benchmark injects them)."""


@dataclass
class Collected:
    """Flat tensors (safetensors-friendly): a key bank plus ragged per-example slices."""

    layers: list[int]
    keys: torch.Tensor
    """[Ltr, G, key_dim] key features of every memory token ever written, by global id."""
    block: torch.Tensor
    """[G] retrieval block of each token."""
    q: torch.Tensor
    """[Ltr, sum T, d] normalised query hidden states; example i owns rows q_off[i]:q_off[i+1]."""
    q_off: torch.Tensor
    cand: torch.Tensor
    """[Ltr, sum n] int32 global ids of the tokens in memory at query time (candidates)."""
    retrievable: torch.Tensor
    """[Ltr, sum n] bool: in the long-term store or staging cache (not the always-shown pool)."""
    cand_off: torch.Tensor
    pos: torch.Tensor
    """[sum R, 2] global-id ranges [lo, hi) of the relevant segments."""
    pos_off: torch.Tensor
    kind: torch.Tensor
    """[E] NEXT or QUESTION."""
    written: torch.Tensor
    """[E] tokens written before the query (ages = written - 1 - id)."""

    def __len__(self) -> int:
        return int(self.kind.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {name: getattr(self, name).contiguous() for name in self.__dataclass_fields__ if name != "layers"}
        out["layers"] = torch.tensor(self.layers, dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Collected:
        fields = {k: v for k, v in t.items() if k != "layers"}
        return cls(layers=[int(x) for x in t["layers"].tolist()], **fields)

    def queries(self, i: int) -> torch.Tensor:
        return self.q[:, int(self.q_off[i]) : int(self.q_off[i + 1])]

    def candidates(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = int(self.cand_off[i]), int(self.cand_off[i + 1])
        return self.cand[:, lo:hi].long(), self.retrievable[:, lo:hi]

    def labels(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        """1.0 where a global id belongs to one of example i's relevant segments."""
        y = torch.zeros(ids.shape, dtype=torch.bool)
        for lo, hi in self.pos[int(self.pos_off[i]) : int(self.pos_off[i + 1])].tolist():
            y |= (ids >= lo) & (ids < hi)
        return y.float()


class _Stop(Exception):
    pass


def query_features(llm: MPlusLLM, state: MemoryState, text: str, layers: Sequence[int]) -> torch.Tensor:
    """[Ltr, T, d] normalised hidden states of the message tokens, as the read path's pre-pass sees them."""
    prompt = llm.chat_prompt([{"role": "user", "content": text}])
    engine = llm.engine
    wanted, last = set(layers), max(layers)
    feats: dict[int, torch.Tensor] = {}

    def pre(layer: int, hidden: torch.Tensor) -> None:
        if layer in wanted:
            feats[layer] = engine.arch.normed(layer, hidden[0, prompt.query_index.to(hidden.device)]).float().cpu()
        if layer == last:
            raise _Stop

    sink = llm.sink(state.config)
    pool, _ = _split_pool(state)
    k = torch.cat([sink.k, pool.k.to(sink.k.dtype)], dim=1)
    v = torch.cat([sink.v, pool.v.to(sink.v.dtype)], dim=1)
    with llm.hook_lock, torch.no_grad(), layer_hooks(engine.arch, pre=pre), contextlib.suppress(_Stop):
        engine.forward(engine._rope_cache(k, v), prompt.ids, k.shape[1])
    return torch.stack([feats[layer] for layer in layers])


def key_features(llm: MPlusLLM, state: MemoryState, count: int, layers: Sequence[int]) -> torch.Tensor:
    """[Ltr, count, key_dim] features of the newest `count` pool tokens (the chunk just written)."""
    pool = state.pool
    out = []
    with torch.no_grad():
        for layer in layers:
            if state.config.source == "input":
                f = kv_features(pool.k[layer, -count:], pool.v[layer, -count:])
            else:
                assert pool.hidden is not None
                hidden = pool.hidden[layer, -count:].to(device=llm.engine.arch.device, dtype=llm.engine.arch.dtype)
                f = llm.engine.arch.normed(layer, hidden)
            out.append(f.float().cpu())
    return torch.stack(out)


def collect(
    llm: MPlusLLM,
    docs: Sequence[Document],
    config: MemoryConfig,
    options: CollectOptions,
    *,
    progress: Callable[[int, int], None] | None = None,
    observe: Callable[[int, MemoryState, dict[tuple[int, int], tuple[int, int]]], None] | None = None,
) -> Collected:
    """Inject every segment once through a real memory and record queries, candidates and labels.

    `observe(example, state, blocks)` sees the memory at each recorded query and every segment's block-id
    range so far (keyed by (document, index)); tests use it to check the labels independently.
    """
    if config.scorer in ("retriever", "hybrid"):
        # Collection scores nothing: the memory only needs K/V (hybrid's word ids and retriever keys are unused).
        config = config.replace(scorer="max_z")
    layers = list(options.layers)
    rng = random.Random(f"collect-{options.seed}")
    state = llm.empty_state(config)
    sink = llm.sink(config)
    written = 0
    key_parts: list[torch.Tensor] = []
    block_parts: list[torch.Tensor] = []
    ranges: dict[tuple[int, int], tuple[int, int]] = {}
    block_ranges: dict[tuple[int, int], tuple[int, int]] = {}
    due: list[tuple[int, str, tuple[int, int]]] = []
    ex_q: list[torch.Tensor] = []
    ex_cand: list[torch.Tensor] = []
    ex_retr: list[torch.Tensor] = []
    ex_pos: list[list[tuple[int, int]]] = []
    ex_kind: list[int] = []
    ex_written: list[int] = []
    total_segments = sum(len(d.segments) for d in docs)

    def ask(text: str, relevant: list[tuple[int, int]], kind: int) -> None:
        stores = (state.pool, state.staging, state.ltm)
        ids = torch.cat([written - 1 - s.age[layers] for s in stores], dim=1)
        # Shown at a read: the newest `read_pool_tokens` of the pool (all of it when None); the rest competes.
        n_pool = len(state.pool)
        n_shown = n_pool if config.read_pool_tokens is None else min(config.read_pool_tokens, n_pool)
        shown = torch.zeros(ids.shape, dtype=torch.bool)
        shown[:, n_pool - n_shown : n_pool] = True
        relevant_ids = torch.zeros(ids.shape[1], dtype=torch.bool)
        for lo, hi in relevant:
            relevant_ids |= (ids[0] >= lo) & (ids[0] < hi)
        if not bool(relevant_ids.any()):
            return  # the relevant tokens were evicted: nothing to learn from this query
        ex_q.append(query_features(llm, state, text[: options.max_query_chars], layers))
        ex_cand.append(ids.to(torch.int32))
        ex_retr.append(~shown)
        ex_pos.append(relevant)
        ex_kind.append(kind)
        ex_written.append(written)
        if observe is not None:
            observe(len(ex_kind) - 1, state, dict(block_ranges))

    for n_done, item in enumerate(interleave(docs, options.seed), start=1):
        while due and due[0][0] <= written:
            _, question, about = due.pop(0)
            ask(question, [about], QUESTION)
        if item.index > 0 and rng.random() < options.next_prob:
            first = max(0, item.index - options.context_segments)
            context = [ranges[(item.doc, j)] for j in range(first, item.index)]
            ask(item.segment.text, context, NEXT)
        ids = llm.encode(llm.frame.render_item(item.segment.text, options.role))
        start, first_block = written, state.next_block
        with torch.no_grad():
            for chunk in split_chunks(ids, config.chunk_size, min(config.min_chunk, max(1, len(ids)))):
                before = state.next_block
                chunk_ids = torch.tensor(chunk, dtype=torch.long)
                with llm.hook_lock:
                    if config.source == "input":
                        state = llm.engine.inject_input(state, sink, chunk_ids)
                    else:
                        state = llm.engine.inject_output(state, sink, chunk_ids)
                count = int((state.pool.block[0] >= before).sum())
                key_parts.append(key_features(llm, state, count, layers))
                block_parts.append(state.pool.block[0, -count:].cpu())
                written += count
        ranges[(item.doc, item.index)] = (start, written)
        block_ranges[(item.doc, item.index)] = (first_block, state.next_block)
        for question in item.segment.questions:
            delay = rng.randint(*options.question_delay)
            due.append((written + delay, question, (start, written)))
            due.sort(key=lambda d: d[0])
        if progress is not None:
            progress(n_done, total_segments)
    for _, question, rel in due:
        ask(question, [rel], QUESTION)

    def offsets(sizes: list[int]) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(sizes, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)

    dk = key_parts[0].shape[-1] if key_parts else 1
    dq = ex_q[0].shape[-1] if ex_q else 1
    pos_flat = [r for rel in ex_pos for r in rel]
    return Collected(
        layers=layers,
        keys=torch.cat(key_parts, dim=1) if key_parts else torch.zeros(len(layers), 0, dk),
        block=torch.cat(block_parts) if block_parts else torch.zeros(0, dtype=torch.int64),
        q=torch.cat(ex_q, dim=1) if ex_q else torch.zeros(len(layers), 0, dq),
        q_off=offsets([q.shape[1] for q in ex_q]),
        cand=torch.cat(ex_cand, dim=1) if ex_cand else torch.zeros(len(layers), 0, dtype=torch.int32),
        retrievable=torch.cat(ex_retr, dim=1) if ex_retr else torch.zeros(len(layers), 0, dtype=torch.bool),
        cand_off=offsets([c.shape[1] for c in ex_cand]),
        pos=torch.tensor(pos_flat, dtype=torch.int64).view(-1, 2),
        pos_off=offsets([len(rel) for rel in ex_pos]),
        kind=torch.tensor(ex_kind, dtype=torch.int64),
        written=torch.tensor(ex_written, dtype=torch.int64),
    )
