"""The latent memory engine: write (inject) and read (first forward of generation) over a stock HF model.

SPEC 3 (injection), 4.5 and 7 (retrieval inside generation), DESIGN 3-4. Memory is a per-layer key/value
prefix: positions 0..P-1 hold [sink, retrieved long-term tokens oldest first, short-term pool], the prompt
starts at P, and attention, masks and backends stay stock.

The sink is what every prefix starts with: for the `input` source the K/V of a fixed header text (the
attention sink and the chat framing that MEASURED.md shows the model needs), for the `output` source the
per-layer BOS vectors of SPEC 2.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import DynamicCache

from mplus_agents.fast import FastDecoder
from mplus_agents.hf.arch import Arch, apply_rope
from mplus_agents.hf.hooks import capture_kv, layer_hooks
from mplus_agents.index import LayerCandidates, LTMIndex, ShortlistIndex, approximate_shared_select, make_index
from mplus_agents.lexical import bm25_block_scores
from mplus_agents.lora import UPDATE, LoRA
from mplus_agents.ops import add_to_pool
from mplus_agents.retrieval import max_z_scores, projector_scores, select_tokens, token_scores
from mplus_agents.retriever import Retriever, kv_features
from mplus_agents.state import MemoryState, TokenStore


@dataclass
class Sink:
    """Prefix entries that lead every memory read: [L, S, kv_heads, head_dim] pre-RoPE keys and values."""

    k: torch.Tensor
    v: torch.Tensor
    hidden: torch.Tensor | None = None
    """[L, S, d] for the `output` source (BOS vectors), re-read under the injection adapter."""

    def __len__(self) -> int:
        return int(self.k.shape[1])


@dataclass
class MPlusWeights:
    """Trained M+ additions on top of the base model (SPEC 2.1). All optional; issue 6 loads them."""

    bos: torch.Tensor | None = None
    """[L, 1, d] per-layer BOS vectors; default: the BOS token embedding in every layer."""
    new_memory_emb: torch.Tensor | None = None
    """[d] added to the last K positions of an injection pass at every layer."""
    retriever: Retriever | None = None
    """Trained f_q / f_k projectors (SPEC 4.5); used when the memory's scorer is `retriever`."""
    adapters: LoRA | None = None
    """LoRA adapters hooked into the model (SPEC 7.1): the update adapter is active during `inject_output`'s
    pass, the generation adapter everywhere else (so every stored K/V is the generation adapter's)."""


@dataclass
class ReadInfo:
    """What one memory read placed in front of the prompt."""

    prefix_tokens: int
    sink_tokens: int
    pool_tokens: int
    retrieved_tokens: int
    retrieved_blocks: list[list[int]] = field(default_factory=list)
    """Block ids retrieved, per layer (one entry for a `shared` selection)."""


def _standardized(s: torch.Tensor) -> torch.Tensor:
    return (s - s.mean()) / (s.std() + 1e-6) if s.numel() > 1 else s


def _latent_scorer(scorer: str) -> str:
    """The scorer of the latent part: `hybrid` adds lexical evidence to `max_z`."""
    return "max_z" if scorer == "hybrid" else scorer


def _split_pool(state: MemoryState) -> tuple[TokenStore, TokenStore | None]:
    """(pool tokens always shown, older pool tokens that become retrieval candidates) per `read_pool_tokens`."""
    pool, shown = state.pool, state.config.read_pool_tokens
    if shown is None or shown >= len(pool):
        return pool, None
    n = len(pool)
    return pool.take(torch.arange(n - shown, n)), pool.take(torch.arange(0, n - shown))


class _PrePassDone(Exception):
    """Ends the query-collecting pre-pass once the last scoring layer has been seen."""


class Candidates:
    """The searchable long-term tokens: merged store then staging cache (DESIGN 8.3), never concatenated.

    Concatenating would copy the whole long-term store (gigabytes at 160k tokens) on every read; instead each
    part is scored in place and only the selected rows are gathered.
    """

    def __init__(self, state: MemoryState, extra: TokenStore | None = None) -> None:
        parts = (state.ltm, state.staging) if extra is None else (state.ltm, state.staging, extra)
        self.parts = [p for p in parts if len(p)]
        self.index_kind = state.config.ltm_index if len(state.ltm) else "exact"  # only the merged store is indexed
        self.offsets = [0]
        for p in self.parts:
            self.offsets.append(self.offsets[-1] + len(p))

    def __len__(self) -> int:
        return self.offsets[-1]

    def scores(self, layer: int, q: torch.Tensor, scorer: str) -> torch.Tensor:
        if scorer == "retriever":  # q holds f_q outputs [T, dim]; keys were projected once, at injection
            return torch.cat([projector_scores(q.to(p.k.device), self._score_key(p)[layer]) for p in self.parts])
        if scorer == "max_z":  # standardised over all candidates, so the parts' logits are joined first
            return max_z_scores(q, [p.k[layer] for p in self.parts], [p.scale("k", layer) for p in self.parts])
        return torch.cat([token_scores(q.to(p.k.device), p.k[layer], scorer, p.scale("k", layer)) for p in self.parts])

    def index(self, layer: int) -> LTMIndex:
        """One layer's candidates behind `config.ltm_index` (mplus_agents.index)."""
        keys = [p.k[layer] for p in self.parts]
        scales = [p.scale("k", layer) for p in self.parts]
        return make_index(
            self.index_kind, LayerCandidates(keys, self.field("block", layer), self.field("age", layer), scales)
        )

    def select(self, layer: int, q: torch.Tensor, scorer: str, budget: int) -> torch.Tensor:
        """A `per_layer` selection; the trained retriever scores its own keys, so it bypasses the key index."""
        if scorer != "retriever":
            return self.index(layer).select(q, scorer, budget, exact=True)
        scores = self.scores(layer, q, scorer)
        return select_tokens(scores, self.field("block", layer), self.field("age", layer), budget, exact=True)

    @staticmethod
    def _score_key(part: TokenStore) -> torch.Tensor:
        if part.score_key is None:
            raise ValueError("scorer='retriever' needs retriever keys, but this memory was written without a retriever")
        return part.score_key

    def field(self, name: str, layer: int) -> torch.Tensor:
        return torch.cat([getattr(p, name)[layer] for p in self.parts])

    def gather(self, name: str, layer: int, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (into the concatenation, order kept) of field `name` in one layer; int8 rows dequantised."""
        first = getattr(self.parts[0], name)
        dtype = torch.float32 if self.parts[0].scale(name, layer) is not None else first.dtype
        out = torch.empty(index.numel(), *first.shape[2:], dtype=dtype, device=first.device)
        for p, lo, hi in zip(self.parts, self.offsets, self.offsets[1:], strict=False):
            mask = (index >= lo) & (index < hi)
            if bool(mask.any()):
                out[mask] = p.rows(name, layer, index[mask] - lo, out.dtype)
        return out

    def take_shared(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [L, m, kv_heads, head_dim] of the same rows in every layer."""
        layers = self.parts[0].layers
        k = torch.stack([self.gather("k", layer, index) for layer in range(layers)])
        v = torch.stack([self.gather("v", layer, index) for layer in range(layers)])
        return k, v


class Engine:
    """Stateless over users: every method takes the user's `MemoryState` and returns a new one."""

    def __init__(self, model: torch.nn.Module, weights: MPlusWeights | None = None) -> None:
        self.arch = Arch(model)
        self.model: Any = cast(Any, model)
        self.weights = weights or MPlusWeights()
        self.use_fast = os.environ.get("MPLUS_FAST_PATH", "1") != "0"
        """Decode steps and `input` injections run on `FastDecoder` when the model supports it (same
        numbers within fp32 tolerance, tests/test_fast.py). Set False (or MPLUS_FAST_PATH=0) for stock HF."""
        self.decode_weights: str | None = os.environ.get("MPLUS_DECODE_WEIGHTS") or None
        """"bfloat16": decode steps of an fp32 model on CPU read bf16 copies of the weight matrices (half the
        bytes, about twice the decode speed; every weight is rounded to bf16, so replies may differ from fp32
        ones). None: the model's own weights. Needs the compiled step; without it a warning and the model's."""
        self._fast: FastDecoder | None = None

    def fast(self) -> FastDecoder | None:
        """The fast path for this model, (re)built when the weights changed; None when off or unsupported."""
        if not self.use_fast or not FastDecoder.supports(self.arch):
            return None
        want = self._decode_dtype()
        fast = self._fast
        if (
            fast is None or not fast.current() or fast.dtype != self.arch.dtype or fast.device != self.arch.device
            or fast.weights != want
        ):
            try:
                fast = FastDecoder(self.arch, weights=want)
            except RuntimeError as exc:
                warnings.warn(f"mplus_agents: decode_weights={self.decode_weights!r} ignored: {exc}", stacklevel=2)
                self.decode_weights = None
                fast = FastDecoder(self.arch)
            self._fast = fast
        return fast

    def _decode_dtype(self) -> torch.dtype | None:
        if self.decode_weights in (None, "", "model"):
            return None
        if self.decode_weights != "bfloat16":
            raise ValueError(f"decode_weights must be 'bfloat16' or None, not {self.decode_weights!r}")
        return torch.bfloat16

    # ------------------------------------------------------------------ prefix plumbing

    def _rope_cache(self, k: torch.Tensor, v: torch.Tensor) -> DynamicCache:
        """A DynamicCache holding [L, P, kvh, hd] pre-RoPE K/V, rotated to positions 0..P-1."""
        dtype, device = self.arch.dtype, self.arch.device
        positions = torch.arange(k.shape[1], device=device)
        cos, sin = self.arch.rope(positions, dtype)
        data = []
        for layer in range(k.shape[0]):
            kl = apply_rope(k[layer].to(device=device, dtype=dtype), cos, sin)
            vl = v[layer].to(device=device, dtype=dtype)
            data.append((kl.permute(1, 0, 2).unsqueeze(0), vl.permute(1, 0, 2).unsqueeze(0)))
        return DynamicCache(ddp_cache_data=data) if data else DynamicCache()

    def forward(
        self, cache: DynamicCache, ids: torch.Tensor, start: int, *, all_logits: bool = False
    ) -> torch.Tensor:
        """Run `ids` [T] at positions start.. with `cache` as context; returns logits [T or 1, vocab]."""
        device = self.arch.device
        ids = ids.to(device).view(1, -1)
        positions = torch.arange(start, start + ids.shape[1], device=device).view(1, -1)
        out = self.model(
            input_ids=ids,
            past_key_values=cache,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        return out.logits[0]  # type: ignore[no-any-return]

    def _adapter(self, name: str | None) -> contextlib.AbstractContextManager[None]:
        """Switch this thread to one LoRA adapter (no-op for a model without adapters)."""
        lora = self.weights.adapters
        if lora is None:
            return contextlib.nullcontext()
        return lora.use(name if name in lora.adapters else lora.generate)

    def _empty_like_pool(self) -> torch.Tensor:
        s = self.arch.shapes
        return torch.zeros(s.layers, 0, s.kv_heads, s.head_dim, dtype=self.arch.dtype, device=self.arch.device)

    # ------------------------------------------------------------------ sinks

    def text_sink(self, ids: torch.Tensor) -> Sink:
        """K/V of a header text run from position 0 with no memory: the `input` source's sink."""
        if ids.numel() == 0:
            empty = self._empty_like_pool()
            return Sink(empty, empty.clone())
        with torch.no_grad(), capture_kv(self.arch) as (keys, values):
            self.forward(DynamicCache(), ids, 0)
        return Sink(torch.stack(keys), torch.stack(values))  # type: ignore[arg-type]

    def bos_sink(self, bos_token_id: int | None) -> Sink:
        """The per-layer BOS vectors of SPEC 2.1, turned into K/V by each layer's own projections."""
        hidden = self.weights.bos
        if hidden is None:
            if bos_token_id is None:
                raise ValueError("the output source needs BOS vectors or a tokenizer with a BOS token")
            emb = self.model.get_input_embeddings().weight[bos_token_id]
            hidden = emb.expand(self.arch.shapes.layers, 1, -1)
        hidden = hidden.to(device=self.arch.device, dtype=self.arch.dtype)
        with torch.no_grad():
            k, v = self.arch.kv_all_layers(hidden)
        return Sink(k, v, hidden)

    # ------------------------------------------------------------------ write path

    def score_keys(self, new: TokenStore) -> torch.Tensor | None:
        """Retriever keys f_k [L, n, dim] of new memory tokens, computed once when they are written."""
        retriever = self.weights.retriever
        if retriever is None:
            return None
        out = []
        with torch.no_grad():
            for layer in range(new.layers):
                if retriever.key_input == "hidden":
                    assert new.hidden is not None, "key_input='hidden' needs the output source's memory vectors"
                    hidden = new.hidden[layer].to(device=self.arch.device, dtype=self.arch.dtype)
                    features = self.arch.normed(layer, hidden)
                else:
                    features = kv_features(new.k[layer], new.v[layer])
                out.append(retriever.keys(layer, features.to(self.arch.device)))
        return torch.stack(out)

    def _with_score_keys(self, new: TokenStore, pool: TokenStore) -> TokenStore:
        keys = self.score_keys(new)
        if keys is None or pool.score_key is None:
            return new
        return new.with_fields(score_key=keys.to(device=pool.score_key.device, dtype=pool.score_key.dtype))

    def inject_input(
        self, state: MemoryState, sink: Sink, ids: torch.Tensor, words: torch.Tensor | None = None
    ) -> MemoryState:
        """`input` source: every chunk token becomes a memory token holding its exact K/V (DESIGN 3).

        The chunk is encoded after [sink, newest `injection_context` pool tokens], so it reads like the
        continuation of what was said just before it. `words` ([T] word ids, `Lexicon.word_ids`) are kept
        with the tokens when the memory uses the `hybrid` scorer.
        """
        pool = state.pool
        width = min(state.config.injection_context, len(pool))
        ctx_k = torch.cat([sink.k, pool.k[:, len(pool) - width :].to(sink.k.dtype)], dim=1)
        ctx_v = torch.cat([sink.v, pool.v[:, len(pool) - width :].to(sink.v.dtype)], dim=1)
        fast = self.fast()
        if fast is not None:
            k, v = fast.prefill_kv(ids, ctx_k, ctx_v)
        else:
            with torch.no_grad(), capture_kv(self.arch) as (keys, values):
                self.forward(self._rope_cache(ctx_k, ctx_v), ids, ctx_k.shape[1])
            k, v = torch.stack(keys), torch.stack(values)  # type: ignore[arg-type]
        k, v = k.to(pool.k.dtype), v.to(pool.v.dtype)
        zeros = torch.zeros(k.shape[0], k.shape[1], dtype=torch.int64, device=k.device)
        new = TokenStore(k=k, v=v, age=zeros, block=zeros.clone())
        if pool.word is not None:
            if words is None or words.numel() != ids.numel():
                raise ValueError("this memory keeps word ids (scorer='hybrid'): pass one per injected token")
            new.word = words.to(device=k.device, dtype=torch.int64).expand(k.shape[0], -1).clone()
        return add_to_pool(state, self._with_score_keys(new, pool))

    def inject_output(self, state: MemoryState, sink: Sink, ids: torch.Tensor) -> MemoryState:
        """`output` source (M+ as trained, SPEC 3.1): the layer outputs at the last K positions become memory.

        Per layer l the sequence is S = [BOS_l, pool_l[-K:], chunk]; e_new is added to S[-K:]; positions
        before min(1+K, 1+C) are keys only (a cache prefix), the rest get queries. When the chunk is shorter
        than K, the newest K-C pool rows are queried too and are re-inserted from pool_l at every layer.
        """
        cfg = state.config
        assert sink.hidden is not None, "the output source needs a BOS-vector sink"
        big_k = cfg.tokens_per_chunk
        pool = state.pool
        assert pool.hidden is not None
        tail = pool.hidden[:, max(0, len(pool) - big_k) :].to(device=self.arch.device, dtype=self.arch.dtype)
        c = int(ids.numel())
        queried_mem = min(max(0, big_k - c), tail.shape[1])
        keyonly_mem = tail.shape[1] - queried_mem
        seq_len = 1 + tail.shape[1] + c  # length of S
        new_from = max(0, seq_len - big_k)  # S[new_from:] receives e_new and becomes the new memory
        e_new = self.weights.new_memory_emb
        if e_new is not None:
            e_new = e_new.to(device=self.arch.device, dtype=self.arch.dtype)

        # Key-only prefix [BOS, tail[:keyonly_mem]] as K/V, e_new included where it falls on them.
        prefix_hidden = torch.cat([sink.hidden, tail[:, :keyonly_mem]], dim=1)
        if e_new is not None and new_from < prefix_hidden.shape[1]:
            prefix_hidden = prefix_hidden.clone()
            prefix_hidden[:, new_from:] += e_new
        # The whole injection pass, its key-only prefix included, runs under the update adapter (SPEC 7.1).
        with torch.no_grad(), self._adapter(UPDATE):
            cache = self._rope_cache(*self.arch.kv_all_layers(prefix_hidden))
        prefix_len = prefix_hidden.shape[1]
        delta: list[torch.Tensor | None] = [None] * self.arch.shapes.layers
        new_count = min(big_k, seq_len - prefix_len)  # queried rows that become memory
        first_new_row = (seq_len - prefix_len) - new_count  # within the queried part
        e_from_row = max(0, new_from - prefix_len)

        def pre(layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
            if queried_mem == 0 and e_new is None:
                return None
            hidden = hidden.clone()
            if queried_mem:
                hidden[0, :queried_mem] = tail[layer, keyonly_mem:]
            if e_new is not None:
                hidden[0, e_from_row:] += e_new
            return hidden

        def post(layer: int, output: torch.Tensor) -> None:
            delta[layer] = output[0, first_new_row:]

        dummy = torch.zeros(queried_mem, dtype=ids.dtype)
        with torch.no_grad(), self._adapter(UPDATE), layer_hooks(self.arch, pre=pre, post=post):
            self.forward(cache, torch.cat([dummy, ids.cpu()]), prefix_len)
        hidden_new = torch.stack(delta)  # type: ignore[arg-type]
        with torch.no_grad():  # stored K/V are what reads see: the generation adapter's (the default)
            k_new, v_new = self.arch.kv_all_layers(hidden_new)
        k, v = k_new.to(pool.k.dtype), v_new.to(pool.v.dtype)
        zeros = torch.zeros(k.shape[0], k.shape[1], dtype=torch.int64, device=k.device)
        new = TokenStore(k=k, v=v, age=zeros, block=zeros.clone(), hidden=hidden_new.to(pool.hidden.dtype))
        return add_to_pool(state, self._with_score_keys(new, pool))

    # ------------------------------------------------------------------ read path

    def _queries(self, layer: int, hidden: torch.Tensor, query_index: torch.Tensor, scorer: str) -> torch.Tensor:
        """What scores the long-term store at `layer`: pre-RoPE queries, or f_q outputs for the trained retriever."""
        normed = self.arch.normed(layer, hidden[0, query_index.to(hidden.device)])
        if scorer == "retriever":
            if self.weights.retriever is None:
                raise ValueError("scorer='retriever' needs a model with a trained retriever")
            return self.weights.retriever.queries(layer, normed)
        return self.arch.q_from_normed(layer, normed)

    def read(
        self,
        state: MemoryState,
        sink: Sink,
        ids: torch.Tensor,
        query_index: torch.Tensor,
        query_words: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DynamicCache, int, ReadInfo]:
        """First forward of a generation with memory: retrieve, assemble the prefix, run the prompt.

        Returns the last-token logits, the filled cache, the next position and what was read.
        `query_index` selects the prompt tokens whose queries score the long-term store; `query_words` are
        the question's word ids for the `hybrid` scorer.
        """
        cfg = state.config
        pool, older = _split_pool(state)
        cand = Candidates(state, older)
        state = dataclasses.replace(state, pool=pool)
        budget = min(cfg.retrieve_tokens, len(cand))
        with torch.no_grad():
            if budget == 0 or query_index.numel() == 0:
                return self._read_fixed(sink, None, pool, ids, [])
            lexical = self._lexical(state, cand, query_words)
            if cfg.selection == "shared":
                index = self._shared_selection(state, sink, cand, ids, query_index, lexical)
                blocks = [sorted(set(cand.gather("block", 0, index).tolist()))]
                return self._read_fixed(sink, cand.take_shared(index), pool, ids, blocks)
            return self._read_per_layer(state, sink, cand, ids, query_index, budget, lexical)

    @staticmethod
    def _lexical(state: MemoryState, cand: Candidates, query_words: torch.Tensor | None) -> torch.Tensor | None:
        """Standardised, weighted BM25 block scores per candidate token for the `hybrid` scorer, else None."""
        cfg = state.config
        if cfg.scorer != "hybrid" or query_words is None or cfg.lexical_weight == 0:
            return None
        scores = bm25_block_scores(query_words, cand.field("word", 0), cand.field("block", 0))
        if not bool((scores > 0).any()):
            return None  # no word of the question was ever said: the latent score decides alone
        return cfg.lexical_weight * _standardized(scores)

    def _read_fixed(
        self,
        sink: Sink,
        retrieved: tuple[torch.Tensor, torch.Tensor] | None,
        pool: TokenStore,
        ids: torch.Tensor,
        blocks: list[list[int]],
    ) -> tuple[torch.Tensor, DynamicCache, int, ReadInfo]:
        parts_k = [sink.k] + ([retrieved[0]] if retrieved is not None else []) + [pool.k]
        parts_v = [sink.v] + ([retrieved[1]] if retrieved is not None else []) + [pool.v]
        dtype = self.arch.dtype
        k = torch.cat([p.to(dtype) for p in parts_k], dim=1)
        v = torch.cat([p.to(dtype) for p in parts_v], dim=1)
        cache = self._rope_cache(k, v)
        prefix = k.shape[1]
        logits = self.forward(cache, ids, prefix)
        info = ReadInfo(
            prefix_tokens=prefix,
            sink_tokens=len(sink),
            pool_tokens=len(pool),
            retrieved_tokens=int(retrieved[0].shape[1]) if retrieved is not None else 0,
            retrieved_blocks=blocks,
        )
        return logits[-1], cache, prefix + int(ids.numel()), info

    def _shared_selection(
        self,
        state: MemoryState,
        sink: Sink,
        cand: Candidates,
        ids: torch.Tensor,
        query_index: torch.Tensor,
        lexical: torch.Tensor | None,
    ) -> torch.Tensor:
        """One selection for all layers: a pre-pass over [sink, pool] gives every layer's queries."""
        cfg = state.config
        wanted = set(cfg.scoring_layers(self.arch.shapes.layers))
        last = max(wanted)
        queries: dict[int, torch.Tensor] = {}

        def pre(layer: int, hidden: torch.Tensor) -> None:
            if layer in wanted:
                queries[layer] = self._queries(layer, hidden, query_index, cfg.scorer)
            if layer == last:
                raise _PrePassDone  # the layers above the last scoring layer are not needed

        k = torch.cat([sink.k, state.pool.k.to(sink.k.dtype)], dim=1)
        v = torch.cat([sink.v, state.pool.v.to(sink.v.dtype)], dim=1)
        with layer_hooks(self.arch, pre=pre), contextlib.suppress(_PrePassDone):
            self.forward(self._rope_cache(k, v), ids, k.shape[1])
        if cand.index_kind == "faiss_ivf" and lexical is None and cfg.scorer != "retriever":  # approximate, opt-in
            layer_index = {layer: cast(ShortlistIndex, cand.index(layer)) for layer in queries}
            got = approximate_shared_select(layer_index, queries, _latent_scorer(cfg.scorer), cfg.retrieve_tokens)
            if got is not None:
                return got
        total = torch.zeros(len(cand), dtype=torch.float32, device=cand.parts[0].k.device)
        for layer, q in queries.items():
            # Layers score on different scales; standardise so each layer gets one vote of equal weight.
            total += _standardized(cand.scores(layer, q, _latent_scorer(cfg.scorer)))
        if lexical is not None:
            total = _standardized(total) + lexical.to(total.device)
        return select_tokens(total, cand.field("block", 0), cand.field("age", 0), cfg.retrieve_tokens, exact=False)

    def _read_per_layer(
        self,
        state: MemoryState,
        sink: Sink,
        cand: Candidates,
        ids: torch.Tensor,
        query_index: torch.Tensor,
        budget: int,
        lexical: torch.Tensor | None,
    ) -> tuple[torch.Tensor, DynamicCache, int, ReadInfo]:
        """SPEC 4.5: each layer retrieves with its own input's queries, inside the forward pass."""
        cfg = state.config
        s = self.arch.shapes
        dtype, device = self.arch.dtype, self.arch.device
        placeholder = torch.zeros(s.layers, budget, s.kv_heads, s.head_dim, dtype=dtype)
        k = torch.cat([sink.k.to(dtype), placeholder.to(sink.k.device), state.pool.k.to(dtype)], dim=1)
        v = torch.cat([sink.v.to(dtype), placeholder.to(sink.v.device), state.pool.v.to(dtype)], dim=1)
        cache = self._rope_cache(k, v)
        start = len(sink)
        cos, sin = self.arch.rope(torch.arange(start, start + budget, device=device), dtype)
        blocks: list[list[int]] = []

        def pre(layer: int, hidden: torch.Tensor) -> None:
            q = self._queries(layer, hidden, query_index, cfg.scorer)
            if lexical is None:
                index = cand.select(layer, q, _latent_scorer(cfg.scorer), budget)
            else:  # hybrid: lexical evidence moves every candidate's score, so the whole store is scored
                scores = cand.scores(layer, q, _latent_scorer(cfg.scorer))
                scores = _standardized(scores) + lexical.to(scores.device)
                index = select_tokens(scores, cand.field("block", layer), cand.field("age", layer), budget, exact=True)
            kl = apply_rope(cand.gather("k", layer, index).to(device=device, dtype=dtype), cos, sin)
            vl = cand.gather("v", layer, index).to(device=device, dtype=dtype)
            cache_layer: Any = cache.layers[layer]
            cache_layer.keys[0, :, start : start + budget] = kl.permute(1, 0, 2)
            cache_layer.values[0, :, start : start + budget] = vl.permute(1, 0, 2)
            blocks.append(sorted(set(cand.gather("block", layer, index).tolist())))

        prefix = k.shape[1]
        with layer_hooks(self.arch, pre=pre):
            logits = self.forward(cache, ids, prefix)
        info = ReadInfo(
            prefix_tokens=prefix,
            sink_tokens=len(sink),
            pool_tokens=len(state.pool),
            retrieved_tokens=budget,
            retrieved_blocks=blocks,
        )
        return logits[-1], cache, prefix + int(ids.numel()), info
