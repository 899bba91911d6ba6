"""Long-term retrieval (SPEC 4.5, DESIGN 5): score candidates with the prompt's queries, pick, order.

This is the exact torch reference. Faster paths (faiss shortlists, Triton kernels) must return what these
functions return; their tests compare against them.

Scores are training-free by default: the layer's own pre-RoPE queries against the stored pre-RoPE keys, i.e.
content similarity in the geometry the layer already attends with. `sigmoid_mean` is SPEC 4.5's formula
(mean over query tokens and heads of sigmoid(q.k)); `max_logit` keeps the best-matching query token, which
suits chat questions where one or two words carry the match.
"""

from __future__ import annotations

import math

import torch

from mplus_agents import quant
from mplus_agents.kernels import dispatch
from mplus_agents.ops import order_oldest_first

SCORE_CHUNK = 65536
"""Candidates scored per matmul, which bounds the [T, heads, chunk] temporary."""
QUANT_CHUNK = 8192
"""int8 keys dequantised per step (a float32 temporary of QUANT_CHUNK x kv_heads x head_dim, 6 MB on SmolLM2)."""


def _chunk(k: torch.Tensor, k_scale: torch.Tensor | None, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    if k_scale is None:
        return k[start:stop].to(dtype)
    return quant.dequantize(k[start:stop], k_scale[start:stop], dtype)


def token_scores(q: torch.Tensor, k: torch.Tensor, scorer: str, k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Score each candidate key against a set of queries.

    q: [T, heads, head_dim] pre-RoPE queries of the prompt's query tokens.
    k: [n, kv_heads, head_dim] pre-RoPE candidate keys (float, or int8 with `k_scale` [n, kv_heads]).
    Returns [n] float32 scores. On CUDA with triton installed, sigmoid_mean and max_logit over float keys run
    the fused kernel.
    """
    if k_scale is None and k.is_cuda and (fused := dispatch.token_scores(q, k, scorer)) is not None:
        return fused
    t, heads, head_dim = q.shape
    n, kv_heads, _ = k.shape
    if n == 0 or t == 0:
        return torch.zeros(n, dtype=torch.float32, device=k.device)
    groups = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.empty(n, dtype=torch.float32, device=k.device)
    step = QUANT_CHUNK if k_scale is not None else SCORE_CHUNK
    if scorer == "max_logit":
        for start in range(0, n, step):
            sc = None if k_scale is None else k_scale[start : start + step]
            out[start : start + step] = head_mean_logits(q, k[start : start + step], sc).amax(dim=0)
        return out
    if scorer == "max_z":
        return max_standardized(head_mean_logits(q, k, k_scale))
    if scorer != "sigmoid_mean":
        raise ValueError(f"unknown scorer {scorer!r}")
    # sigmoid is not linear: one GEMM per KV head over the strided [n, head_dim] view (BLAS reads it in place).
    kdtype = torch.float32 if k_scale is not None else k.dtype
    qg = q.to(kdtype).reshape(t, kv_heads, groups, head_dim)
    for start in range(0, n, step):
        kc = _chunk(k, k_scale, start, start + step, kdtype)
        acc = torch.zeros(kc.shape[0], dtype=torch.float32, device=k.device)
        for h in range(kv_heads):
            logits = (qg[:, h].reshape(t * groups, head_dim) @ kc[:, h].T).float() * scale
            acc += torch.sigmoid(logits).sum(dim=0)
        out[start : start + kc.shape[0]] = acc / (t * heads)
    return out


def head_mean_logits(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """[T, n] float32: mean over query heads of q.k/sqrt(head_dim), each query head against its KV head.

    The head mean is linear, so it folds into the query: mean_h q_h.k_h = (q_bar . k_flat) / kv_heads with
    q_bar the group-mean query per KV head. One contiguous GEMM [T, kv*hd] x [kv*hd, n], no copies of k.
    int8 keys (with `k_scale` [n, kv_heads]) are dequantised, and half-precision keys widened, `QUANT_CHUNK` rows
    at a time instead: products in float32. (A bfloat16 product rounds every logit to 8 bits, which makes ties
    that the selection then breaks by accident of summation order.)
    """
    t, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    q_bar = q.reshape(t, kv_heads, groups, head_dim).mean(dim=2).reshape(t, kv_heads * head_dim)
    q_bar = q_bar * (1.0 / (math.sqrt(head_dim) * kv_heads))
    return flat_logits(q_bar, k, k_scale)


def flat_logits(qv: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """[T, n] float32 qv . k_flat for query vectors qv [T, D] and keys k [n, ...] (D values per row).

    Float keys: one GEMM in place. int8 keys (with `k_scale`) and half-precision keys: `QUANT_CHUNK` rows at a
    time, dequantised or widened, products in float32.
    """
    n = k.shape[0]
    if k_scale is None and k.dtype in (torch.float32, torch.float64):
        return (qv.to(k.dtype) @ k.flatten(1).T).float()
    qf = qv.float()
    out = torch.empty(qv.shape[0], n, dtype=torch.float32, device=k.device)
    for start in range(0, n, QUANT_CHUNK):
        kc = _chunk(k, k_scale, start, start + QUANT_CHUNK, torch.float32)
        out[:, start : start + kc.shape[0]] = qf @ kc.flatten(1).T
    return out


def max_standardized(logits: torch.Tensor) -> torch.Tensor:
    """Standardise each query token's logits over all candidates, then keep the best query token.

    An IDF-like correction: a query word that matches everything ("my", "?") has a high mean and gets
    little credit, while a word whose match is rare ("locker") stands out. Needs every candidate at once,
    so callers with several candidate parts concatenate their `head_mean_logits` first.
    """
    if logits.shape[1] < 2:
        return logits.amax(dim=0) if logits.shape[1] else logits.new_zeros(0)
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True) + 1e-6
    return ((logits - mean) / std).amax(dim=0)


def max_z_scores(
    q: torch.Tensor, parts: list[torch.Tensor], scales: list[torch.Tensor | None] | None = None
) -> torch.Tensor:
    """`max_z` over candidate keys split into parts ([n_i, kv_heads, head_dim] each), standardised over all.

    `scales[i]` ([n_i, kv_heads]) marks part i as int8 keys (`mplus_agents.quant`). Returns [sum n_i] float32.
    On CUDA with triton installed and float keys, a two-pass kernel without the [T, n] logits.
    """
    scales = scales if scales is not None else [None] * len(parts)
    float_keys = all(s is None for s in scales)
    if float_keys and parts and parts[0].is_cuda and (fused := dispatch.max_z_scores(q, parts)) is not None:
        return fused
    return max_standardized(
        torch.cat([head_mean_logits(q.to(k.device), k, s) for k, s in zip(parts, scales, strict=True)], 1)
    )


def projector_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """SPEC 4.5 with a trained retriever: mean_t sigmoid(f_q(x_t) . f_k(m_j)), no scaling.

    q: [T, d_proj]; keys: [n, d_proj]. Returns [n] float32. On CUDA with triton installed, the fused kernel.
    """
    if keys.is_cuda and (fused := dispatch.projector_scores(q, keys)) is not None:
        return fused
    if keys.shape[0] == 0 or q.shape[0] == 0:
        return torch.zeros(keys.shape[0], dtype=torch.float32, device=keys.device)
    out = torch.empty(keys.shape[0], dtype=torch.float32, device=keys.device)
    qc = q.to(keys.dtype)
    for start in range(0, keys.shape[0], SCORE_CHUNK):
        out[start : start + SCORE_CHUNK] = torch.sigmoid((qc @ keys[start : start + SCORE_CHUNK].T).float()).mean(0)
    return out


def block_scores(scores: torch.Tensor, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduce token scores to block scores (max over the block's tokens).

    Returns (block ids [b], block scores [b], inverse [n] mapping each token to its block's row).
    """
    ids, inverse = torch.unique(block, return_inverse=True)
    best = torch.full((ids.numel(),), -math.inf, dtype=torch.float32, device=scores.device)
    best = best.scatter_reduce(0, inverse, scores.float(), reduce="amax", include_self=True)
    return ids, best, inverse


def select_tokens(
    scores: torch.Tensor, block: torch.Tensor, age: torch.Tensor, budget: int, *, exact: bool
) -> torch.Tensor:
    """Pick whole best-scoring blocks until `budget` tokens, return their token indices oldest first.

    With `exact`, the last block is cut so exactly min(budget, n) tokens come back: every layer then has the
    same prefix length, which `per_layer` selection needs (SPEC 4.5 always places K0 tokens). Without it only
    whole blocks are taken (at most `budget` tokens; the best block is cut only when it alone is larger than
    the budget). Ties between equal scores go to the newer block. With block ids unique per token this is
    plain token top-k.
    """
    n = scores.numel()
    if budget <= 0 or n == 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    if n <= budget:
        return order_oldest_first(age, torch.arange(n, device=scores.device))
    ids, best, inverse = block_scores(scores, block)
    sizes = torch.bincount(inverse, minlength=ids.numel())
    # Sort by score, ties to the newer (larger id) block; a stable two-key sort.
    by_id = torch.argsort(ids, descending=True)
    rank = by_id[torch.argsort(best[by_id], descending=True, stable=True)]
    cum = torch.cumsum(sizes[rank], dim=0)
    if exact:
        take = int(torch.searchsorted(cum, torch.tensor(budget, device=cum.device), right=False)) + 1
    else:
        take = int((cum <= budget).sum())
        if take == 0:
            # Not even the best block fits: cut it rather than overrun the budget, which bounds the prefix.
            take, exact = 1, True
    chosen = torch.zeros(ids.numel(), dtype=torch.bool, device=scores.device)
    chosen[rank[:take]] = True
    index = torch.nonzero(chosen[inverse]).flatten()
    if exact and index.numel() > budget:
        # The last chosen block is only partly taken: keep its best-scoring tokens.
        last = rank[take - 1]
        full = index[inverse[index] != last]
        partial = index[inverse[index] == last]
        keep = budget - full.numel()
        partial = partial[scores[partial].topk(keep).indices]
        index = torch.cat([full, partial])
    return order_oldest_first(age, index)
