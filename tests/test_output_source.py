"""The `output` source (M+ as trained) equals a slow, literal reference of SPEC 2.3 and 3.1.

The engine builds the `output` source out of cache prefixes and layer hooks on a stock HF model. The
reference here shares none of that: it rebuilds every decoder layer from the layer's own weights (norms,
projections, MLP, the model's rotary table), concatenates the memory prefix into the hidden states exactly as
SPEC 2.3 writes it, and computes attention with an explicit mask. A plumbing mistake in the engine (a wrong
position, a missing e_new, a pool row not re-inserted) therefore cannot hide behind shared code.

Checked on tiny random Llama (GQA) and Qwen3 (q_norm/k_norm) models in fp32, relative error under 1e-4:
injection (new memory vectors and their stored K/V), reads with long-term retrieval (all retrieved, and a
per-layer selection recomputed from the reference's own queries), and reads from an empty memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers.activations import ACT2FN

from mplus_agents import MemoryConfig, MemoryState, MPlusLLM
from mplus_agents.engine import MPlusWeights, ReadInfo
from mplus_agents.retrieval import select_tokens, token_scores
from tests.conftest import CharTokenizer, tiny_llama, tiny_qwen3

TOL = 1e-4
K_NEW = 8
"""Tokens per chunk K: small so that chunks both longer and shorter than K fit in a tiny test."""

PrefixFn = Callable[[int, torch.Tensor], torch.Tensor]
"""(layer, that layer's input hidden states [T, d]) -> the memory prefix of that layer [p, d]."""


# ---------------------------------------------------------------------------------------------- reference


def rms_norm(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """RMSNorm over the last dimension with the module's weight and epsilon."""
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    return norm.weight * (x * torch.rsqrt(variance + norm.variance_epsilon))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(model: Any, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim] for positions 0..length-1 from the model's own rotary table."""
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = model.model.rotary_emb(probe, torch.arange(length).view(1, -1))
    return cos[0], sin[0]


def project_heads(x: torch.Tensor, proj: Any, head_norm: Any, heads: int) -> torch.Tensor:
    """[n, d] normed hidden -> [n, heads, head_dim] pre-RoPE (Qwen3 normalises each head, Llama does not)."""
    out = proj(x).view(x.shape[0], heads, -1)
    return rms_norm(out, head_norm) if head_norm is not None else out


def reference_layer(model: Any, layer_idx: int, seq: torch.Tensor, p: int) -> torch.Tensor:
    """SPEC 2.3, one decoder layer: `seq` = [prefix (p rows, keys/values only) ; inputs (T rows)].

    Returns the layer output for the T input rows. Positions are 0..p+T-1 over the whole concatenation.
    """
    cfg = model.config
    layer = model.model.layers[layer_idx]
    attn = layer.self_attn
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    total = seq.shape[0]
    t = total - p
    x = seq[p:]  # [T, d] the inputs; their residual stream

    normed = rms_norm(seq, layer.input_layernorm)  # [p+T, d] prefix and inputs normalised together
    q = project_heads(normed[p:], attn.q_proj, getattr(attn, "q_norm", None), heads)  # [T, H, hd]
    k = project_heads(normed, attn.k_proj, getattr(attn, "k_norm", None), kv_heads)  # [p+T, KVH, hd]
    v = attn.v_proj(normed).view(total, kv_heads, -1)  # [p+T, KVH, hd]
    head_dim = q.shape[-1]

    cos, sin = rotary(model, total)  # [p+T, hd]
    q = q * cos[p:, None, :] + rotate_half(q) * sin[p:, None, :]
    k = k * cos[:, None, :] + rotate_half(k) * sin[:, None, :]

    # GQA: query head h reads KV head h // (H / KVH).
    groups = heads // kv_heads
    k = k.repeat_interleave(groups, dim=1)  # [p+T, H, hd]
    v = v.repeat_interleave(groups, dim=1)

    # Input row i (absolute position p+i) sees every prefix column and input columns 0..i.
    rows = torch.arange(t).view(-1, 1)
    cols = torch.arange(total).view(1, -1)
    visible = (cols < p) | (cols - p <= rows)  # [T, p+T]

    logits = torch.einsum("thd,shd->hts", q, k) / math.sqrt(head_dim)  # [H, T, p+T]
    logits = logits.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    mixed = torch.einsum("hts,shd->thd", weights, v).reshape(t, heads * head_dim)  # [T, H*hd]

    h = x + attn.o_proj(mixed)  # residual only for the inputs
    mlp = layer.mlp
    act = ACT2FN[cfg.hidden_act]
    hn = rms_norm(h, layer.post_attention_layernorm)
    return h + mlp.down_proj(act(mlp.gate_proj(hn)) * mlp.up_proj(hn))


def reference_injection(
    model: Any,
    bos: torch.Tensor,
    e_new: torch.Tensor | None,
    pool_hidden: torch.Tensor,
    chunk: list[int],
    k_new: int,
) -> torch.Tensor:
    """SPEC 3.1: the new memory vectors delta [L, m, d] of one chunk, given the pool's memory vectors [L, n, d].

    Per layer S = [BOS_l, pool_l[-K:], X_l]; e_new is added to S[-K:]; rows before p are keys only; the last
    K outputs are delta_l and the chunk outputs are X_{l+1}. p = min(1+K, 1+C) when the pool holds at least
    K rows; in general the last max(C, K) rows are queried, never BOS (p >= 1), which is the same rule for a
    pool still filling up. With C < K the queried pool rows are rebuilt from pool_l at every layer simply
    because S is rebuilt per layer.
    """
    c = len(chunk)
    x = model.model.embed_tokens(torch.tensor(chunk))  # [C, d], no BOS token id
    deltas = []
    for layer_idx in range(model.config.num_hidden_layers):
        n = pool_hidden.shape[1]
        tail = pool_hidden[layer_idx, max(0, n - k_new) :]  # the K newest pool rows (fewer while filling)
        seq = torch.cat([bos[layer_idx], tail, x])  # [1 + |tail| + C, d]
        if e_new is not None:
            seq = seq.clone()
            # S[-K:] += e_new at every layer. While the pool is filling S may be shorter than K; the slice then
            # covers BOS too, as the literal rule says (the release never meets this: its pool is always full).
            seq[max(0, seq.shape[0] - k_new) :] += e_new
        p = max(1, seq.shape[0] - max(c, k_new))
        out = reference_layer(model, layer_idx, seq, p)  # rows p.. of S
        deltas.append(out[max(0, out.shape[0] - k_new) :])
        x = out[out.shape[0] - c :]  # only chunk rows continue
    return torch.stack(deltas)


def reference_logits(model: Any, prefix_of: PrefixFn, ids: list[int]) -> torch.Tensor:
    """SPEC 2.3 over all layers with the prefix rebuilt (never propagated) per layer; last-token logits."""
    x = model.model.embed_tokens(torch.tensor(ids))
    for layer_idx in range(model.config.num_hidden_layers):
        prefix = prefix_of(layer_idx, x)
        x = reference_layer(model, layer_idx, torch.cat([prefix, x]), prefix.shape[0])
    return model.lm_head(rms_norm(x[-1], model.model.norm))  # type: ignore[no-any-return]


def reference_kv(model: Any, layer_idx: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE K/V [n, KVH, hd] that layer `layer_idx` reads from memory vectors [n, d]."""
    layer = model.model.layers[layer_idx]
    attn = layer.self_attn
    kv_heads = model.config.num_key_value_heads
    normed = rms_norm(hidden, layer.input_layernorm)
    k = project_heads(normed, attn.k_proj, getattr(attn, "k_norm", None), kv_heads)
    v = attn.v_proj(normed).view(hidden.shape[0], kv_heads, -1)
    return k, v


def reference_queries(model: Any, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE queries [T, H, hd] of layer inputs [T, d] (what scores the long-term store, SPEC 4.5)."""
    layer = model.model.layers[layer_idx]
    attn = layer.self_attn
    normed = rms_norm(x, layer.input_layernorm)
    return project_heads(normed, attn.q_proj, getattr(attn, "q_norm", None), model.config.num_attention_heads)


# ---------------------------------------------------------------------------------------------- helpers


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def make_llm(make: Callable[[], Any], config: MemoryConfig, seed: int = 7) -> tuple[MPlusLLM, MPlusWeights]:
    """A tiny model with random trained-looking M+ weights (BOS vectors and e_new of the residual's scale)."""
    model = make()
    gen = torch.Generator().manual_seed(seed)
    layers, d = model.config.num_hidden_layers, model.config.hidden_size
    weights = MPlusWeights(
        bos=torch.randn(layers, 1, d, generator=gen) * 0.05,
        new_memory_emb=torch.randn(d, generator=gen) * 0.05,
    )
    return MPlusLLM(model, CharTokenizer(), config, weights=weights), weights


def random_ids(n: int, gen: torch.Generator) -> list[int]:
    return [int(i) for i in torch.randint(3, 64, (n,), generator=gen)]


def fill(llm: MPlusLLM, state: MemoryState, lengths: list[int], gen: torch.Generator) -> MemoryState:
    for length in lengths:
        pending, state = llm.write(state, random_ids(length, gen))
        assert pending == []
    return state


def read_logits(
    llm: MPlusLLM, state: MemoryState, prompt: list[int], query_index: torch.Tensor
) -> tuple[torch.Tensor, ReadInfo]:
    with torch.no_grad():
        logits, _, _, info = llm.engine.read(state, llm.sink(state.config), torch.tensor(prompt), query_index)
    return logits, info


def long_term(state: MemoryState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates in the engine's order (merged store, then staging): hidden [L, n, d], age, block [L, n]."""
    ltm, stg = state.ltm, state.staging
    assert ltm.hidden is not None and stg.hidden is not None
    return (
        torch.cat([ltm.hidden, stg.hidden], dim=1),
        torch.cat([ltm.age, stg.age], dim=1),
        torch.cat([ltm.block, stg.block], dim=1),
    )


MODELS = [pytest.param(tiny_llama, id="llama"), pytest.param(tiny_qwen3, id="qwen3")]


# ---------------------------------------------------------------------------------------------- injection


@pytest.mark.parametrize("make", MODELS)
def test_injection_equals_reference(make: Callable[[], Any]) -> None:
    cfg = MemoryConfig.mplus(
        pool_size=24, tokens_per_chunk=K_NEW, retrieve_tokens=16, chunk_size=24, min_chunk=3, ltm_merge_every=2
    )
    llm, weights = make_llm(make, cfg)
    assert weights.bos is not None and weights.new_memory_emb is not None
    model: Any = llm.model
    gen = torch.Generator().manual_seed(1)
    state = llm.empty_state(cfg)
    # C < K on an empty pool, C >= K on a partial tail, C < K on a full tail (5 pool rows queried),
    # C == K, then enough chunks that the pool overflows and drops.
    lengths = [5, 20, 3, 12, 8, 17, 6, 24, 4]
    cases: set[object] = set()
    for length in lengths:
        chunk = random_ids(length, gen)
        before = state
        assert before.pool.hidden is not None
        pending, state = llm.write(before, chunk)
        assert pending == [] and state.injections == before.injections + 1
        with torch.no_grad():
            want = reference_injection(model, weights.bos, weights.new_memory_emb, before.pool.hidden, chunk, K_NEW)
        m = want.shape[1]
        assert state.pool.hidden is not None
        assert len(state.pool) == min(cfg.pool_size, len(before.pool) + m)
        got = state.pool.hidden[:, -m:]
        assert rel_err(got, want) < TOL, (length, len(before.pool))
        for layer_idx in range(model.config.num_hidden_layers):
            with torch.no_grad():
                k, v = reference_kv(model, layer_idx, want[layer_idx])
            assert rel_err(state.pool.k[layer_idx, -m:], k) < TOL
            assert rel_err(state.pool.v[layer_idx, -m:], v) < TOL
        # The comparison is sensitive to e_new: leaving it out moves the memory far beyond the tolerance.
        with torch.no_grad():
            plain = reference_injection(model, weights.bos, None, before.pool.hidden, chunk, K_NEW)
        assert rel_err(plain, want) > 100 * TOL
        cases.add((len(before.pool) >= K_NEW, length >= K_NEW))
        if len(before.pool) + m > cfg.pool_size:
            cases.add("dropped")
    assert cases >= {(False, False), (False, True), (True, False), (True, True), "dropped"}


# ---------------------------------------------------------------------------------------------- generation


def memory_prefix(
    bos: torch.Tensor, state: MemoryState, retrieved: Callable[[int, torch.Tensor], torch.Tensor]
) -> PrefixFn:
    """[BOS_l, retrieved long-term rows of layer l (oldest first), pool_l] as hidden vectors."""
    pool = state.pool.hidden
    assert pool is not None

    def prefix_of(layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([bos[layer_idx], retrieved(layer_idx, x), pool[layer_idx]])

    return prefix_of


@pytest.mark.parametrize("make", MODELS)
def test_read_with_all_long_term_equals_reference(make: Callable[[], Any]) -> None:
    """retrieve_tokens >= long-term size: every long-term row is read, oldest first (age desc, ties by index)."""
    cfg = MemoryConfig.mplus(
        pool_size=16, tokens_per_chunk=K_NEW, retrieve_tokens=1000, chunk_size=24, min_chunk=3, ltm_merge_every=2
    )
    llm, weights = make_llm(make, cfg)
    assert weights.bos is not None
    gen = torch.Generator().manual_seed(2)
    state = fill(llm, llm.empty_state(cfg), [20, 6, 17, 24, 9, 13, 22, 5, 18], gen)
    assert len(state.ltm) > 0 and len(state.staging) > 0  # merged and staged rows are both read
    cand_hidden, age, _ = long_term(state)
    n = cand_hidden.shape[1]
    assert n <= cfg.retrieve_tokens

    def retrieved(layer_idx: int, _x: torch.Tensor) -> torch.Tensor:
        order = sorted(range(n), key=lambda i: (-int(age[layer_idx, i]), i))
        return cand_hidden[layer_idx, order]

    prompt = random_ids(11, gen)
    got, info = read_logits(llm, state, prompt, torch.arange(len(prompt)))
    with torch.no_grad():
        want = reference_logits(llm.model, memory_prefix(weights.bos, state, retrieved), prompt)
    assert info.retrieved_tokens == n and info.prefix_tokens == 1 + n + len(state.pool)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("make", MODELS)
def test_read_with_per_layer_retrieval_equals_reference(make: Callable[[], Any]) -> None:
    """Each layer selects its long-term rows with its own input's queries, inside the forward (SPEC 4.5)."""
    cfg = MemoryConfig.mplus(
        pool_size=16, tokens_per_chunk=K_NEW, retrieve_tokens=12, chunk_size=24, min_chunk=3, ltm_merge_every=2
    )
    llm, weights = make_llm(make, cfg)
    assert weights.bos is not None
    model: Any = llm.model
    gen = torch.Generator().manual_seed(3)
    state = fill(llm, llm.empty_state(cfg), [20, 6, 17, 24, 9, 13, 22, 5, 18, 21], gen)
    cand_hidden, age, block = long_term(state)
    assert cand_hidden.shape[1] > 2 * cfg.retrieve_tokens  # a real choice in every layer
    prompt = random_ids(14, gen)
    query_index = torch.arange(3, 11)  # a part of the prompt, as chat_prompt passes the user's words
    chosen: list[torch.Tensor] = []

    def retrieved(layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        q = reference_queries(model, layer_idx, x[query_index])
        keys, _ = reference_kv(model, layer_idx, cand_hidden[layer_idx])
        scores = token_scores(q, keys, cfg.scorer)
        index = select_tokens(scores, block[layer_idx], age[layer_idx], cfg.retrieve_tokens, exact=True)
        chosen.append(index)
        return cand_hidden[layer_idx, index]

    got, info = read_logits(llm, state, prompt, query_index)
    with torch.no_grad():
        want = reference_logits(model, memory_prefix(weights.bos, state, retrieved), prompt)
    assert info.retrieved_tokens == cfg.retrieve_tokens
    picked = [sorted(block[layer_idx, index].tolist()) for layer_idx, index in enumerate(chosen)]
    assert info.retrieved_blocks == picked
    assert len({tuple(p) for p in picked}) > 1  # layers really choose differently
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("make", MODELS)
def test_empty_memory_read_equals_bos_only_reference(make: Callable[[], Any]) -> None:
    cfg = MemoryConfig.mplus(pool_size=16, tokens_per_chunk=K_NEW, retrieve_tokens=8, chunk_size=24, min_chunk=3)
    llm, weights = make_llm(make, cfg)
    assert weights.bos is not None
    bos = weights.bos
    prompt = random_ids(9, torch.Generator().manual_seed(4))
    got, info = read_logits(llm, llm.empty_state(cfg), prompt, torch.arange(len(prompt)))
    with torch.no_grad():
        want = reference_logits(llm.model, lambda layer_idx, _x: bos[layer_idx], prompt)
    assert info.prefix_tokens == 1 and info.retrieved_tokens == 0
    assert rel_err(got, want) < TOL
