"""Triton kernel: fused long-term scoring (SPEC 4.5) and top-k, checked against reference.py.

One program scores a tile of BLOCK_N candidate keys against all query rows: the q.k products, the sigmoid and
the mean over query tokens and heads (or the max over query tokens of the head-mean logit) happen in registers,
so the [T, heads, n] logits never reach memory; a key tile is loaded once per step of BLOCK_R query rows (one
step for max_logit/max_z up to 32 query tokens; sigmoid_mean has T * heads/kv_heads rows per KV head).
Importing this module imports triton; the dispatcher (dispatch.py) only does so when the tensors are on CUDA,
and the tests do it under TRITON_INTERPRET=1 on CPU.

Inputs are widened to float32 on load. For bf16/fp16 inputs the products then run as TF32 on tensor cores,
which is exact for them (TF32 holds their mantissas); float32 inputs use IEEE products so scores match torch.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("mplus_agents.kernels needs triton: pip install 'mplus-agents[triton]'") from exc

BLOCK_N = 64
"""Candidates per program."""
MAX_BLOCK_R = 32
"""Query rows per inner step; T is small (a prompt's query tokens), so one or two steps cover it."""
MAX_BLOCK_D = {torch.float32: 64}
"""Feature chunk per dot product for float32 keys (128 for 16-bit ones): a 16-bit head_dim fits in one chunk, a
wide projector dimension takes several. IEEE float32 dot products stage their tiles in shared memory, and a
128-wide chunk would need 96 KB of it on sm_80/86, near the 99 KB that sm_86 allows (tests/kernels_compile.py)."""


@triton.jit
def _tile_logits(
    q_base,
    k_base,
    offs_r,
    offs_n,
    mask_r,
    mask_n,
    dim,
    stride_qr,
    stride_kn,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """[BLOCK_R, BLOCK_N] float32 dot products of query rows with candidate keys over `dim` features."""
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        q = tl.load(
            q_base + offs_r[:, None] * stride_qr + offs_d[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0
        ).to(tl.float32)
        # int64 row offsets: n * stride passes 2**31 elements at ~10M tokens of a wide model.
        k = tl.load(
            k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(q, tl.trans(k), input_precision=PRECISION)
    return acc


@triton.jit
def _head_sum_logits(
    q_ptr,
    k_ptr,
    offs_r,
    offs_n,
    mask_r,
    mask_n,
    dim,
    kv_heads,
    stride_qg,
    stride_qr,
    stride_kn,
    stride_kg,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """[BLOCK_R, BLOCK_N] float32 logits summed over the KV heads (the head mean is folded into q)."""
    logits = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for g in range(0, kv_heads):
        logits += _tile_logits(
            q_ptr + g * stride_qg, k_ptr + g * stride_kg, offs_r, offs_n, mask_r, mask_n, dim,
            stride_qr, stride_kn, BLOCK_R, BLOCK_N, BLOCK_D, PRECISION,
        )  # fmt: skip
    return logits


@triton.jit
def _score_kernel(
    q_ptr,
    k_ptr,
    out_ptr,
    shift_ptr,
    inv_std_ptr,
    n,
    rows,
    dim,
    kv_heads,
    stride_qg,
    stride_qr,
    stride_kn,
    stride_kg,
    scale,
    inv_count,
    MAX_MODE: tl.constexpr,
    STANDARDIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """q: [kv_heads, rows, dim] (row r of group g is one query head of one token); k: [n, kv_heads, dim].

    MAX_MODE=False: out[j] = inv_count * sum over g, r of sigmoid(scale * q[g,r].k[j,g]).
    MAX_MODE=True:  out[j] = max over r of sum over g of q[g,r].k[j,g] (head mean and scale folded into q),
    with STANDARDIZE each row's logit first becomes (logit - shift[r]) * inv_std[r] (the max_z scorer).
    """
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    if MAX_MODE:
        result = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        for r0 in range(0, rows, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rows
            logits = _head_sum_logits(
                q_ptr, k_ptr, offs_r, offs_n, mask_r, mask_n, dim, kv_heads, stride_qg, stride_qr, stride_kn,
                stride_kg, BLOCK_R, BLOCK_N, BLOCK_D, PRECISION,
            )  # fmt: skip
            if STANDARDIZE:
                shift = tl.load(shift_ptr + offs_r, mask=mask_r, other=0.0)
                inv_std = tl.load(inv_std_ptr + offs_r, mask=mask_r, other=0.0)
                logits = (logits - shift[:, None]) * inv_std[:, None]
            logits = tl.where(mask_r[:, None], logits, float("-inf"))
            result = tl.maximum(result, tl.max(logits, axis=0))
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for g in range(0, kv_heads):
            for r0 in range(0, rows, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                mask_r = offs_r < rows
                logits = _tile_logits(
                    q_ptr + g * stride_qg, k_ptr + g * stride_kg, offs_r, offs_n, mask_r, mask_n, dim,
                    stride_qr, stride_kn, BLOCK_R, BLOCK_N, BLOCK_D, PRECISION,
                )  # fmt: skip
                prob = tl.sigmoid(logits * scale)
                acc += tl.sum(tl.where(mask_r[:, None], prob, 0.0), axis=0)
        result = acc * inv_count
    tl.store(out_ptr + offs_n, result, mask=mask_n)


@triton.jit
def _moments_kernel(
    q_ptr,
    k_ptr,
    mean_ptr,
    m2_ptr,
    n,
    rows,
    dim,
    kv_heads,
    stride_qg,
    stride_qr,
    stride_kn,
    stride_kg,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per tile of candidates and per query row r: mean and sum of squared deviations of the head-mean logits.

    Written as [tiles, rows]; the caller merges tiles with Chan's formula, which stays exact where a running
    sum of squares would cancel (logits can share a large offset across a million candidates).
    """
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    count = tl.minimum(n - pid * BLOCK_N, BLOCK_N).to(tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rows
        logits = _head_sum_logits(
            q_ptr, k_ptr, offs_r, offs_n, mask_r, mask_n, dim, kv_heads, stride_qg, stride_qr, stride_kn,
            stride_kg, BLOCK_R, BLOCK_N, BLOCK_D, PRECISION,
        )  # fmt: skip
        mean = tl.sum(tl.where(mask_n[None, :], logits, 0.0), axis=1) / count
        dev = tl.where(mask_n[None, :], logits - mean[:, None], 0.0)
        tl.store(mean_ptr + pid * rows + offs_r, mean, mask=mask_r)
        tl.store(m2_ptr + pid * rows + offs_r, tl.sum(dev * dev, axis=1), mask=mask_r)


def _block(size: int, cap: int) -> int:
    """Power-of-two tile edge covering `size`, at least 16 (tl.dot's minimum) and at most `cap`."""
    return max(16, min(cap, triton.next_power_of_2(max(size, 1))))


def launch_meta(rows: int, dim: int, dtype: torch.dtype) -> dict[str, object]:
    """The compile-time tile parameters for `rows` query rows, `dim` features and keys of `dtype`."""
    return {
        "BLOCK_N": BLOCK_N,
        "BLOCK_R": _block(rows, MAX_BLOCK_R),
        "BLOCK_D": _block(dim, MAX_BLOCK_D.get(dtype, 128)),
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def _prepare(q3: torch.Tensor, k3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:
    """Unit feature strides (the kernels' only layout requirement) and the compile-time tile parameters."""
    if k3.stride(2) != 1:
        k3 = k3.contiguous()
    return q3.contiguous(), k3, launch_meta(q3.shape[1], k3.shape[2], k3.dtype)


def _launch(
    q3: torch.Tensor,
    k3: torch.Tensor,
    scale: float,
    inv_count: float,
    max_mode: bool,
    standardize: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the score kernel on q3 [kv_heads, rows, dim] and k3 [n, kv_heads, dim]; [n] float32."""
    n, kv_heads, dim = k3.shape
    out = torch.empty(n, dtype=torch.float32, device=k3.device)
    if n == 0:
        return out
    q3, k3, meta = _prepare(q3, k3)
    shift, inv_std = standardize if standardize is not None else (out, out)  # unread unless STANDARDIZE
    _score_kernel[(triton.cdiv(n, BLOCK_N),)](
        q3, k3, out, shift, inv_std, n, q3.shape[1], dim, kv_heads,
        q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), scale, inv_count,
        MAX_MODE=max_mode, STANDARDIZE=standardize is not None, **meta,
    )  # fmt: skip
    return out


def _folded_query(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[kv_heads, T, head_dim] in k's dtype: the scaled group-mean query per KV head.

    The head mean is linear, so summing this query's dot products over KV heads gives the head-mean logit
    with one query row per token instead of one per (token, head); retrieval.head_mean_logits folds it alike.
    """
    t, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q_bar = q.float().reshape(t, kv_heads, heads // kv_heads, head_dim).mean(dim=2) / (math.sqrt(head_dim) * kv_heads)
    return q_bar.to(k.dtype).permute(1, 0, 2)


def token_scores(q: torch.Tensor, k: torch.Tensor, scorer: str) -> torch.Tensor:
    """Kernel version of retrieval.token_scores for the `sigmoid_mean`, `max_logit` and `max_z` scorers.

    q: [T, heads, head_dim]; k: [n, kv_heads, head_dim] (any strides with a unit feature stride, e.g. one
    layer of a [L, n, kv_heads, head_dim] store). Returns [n] float32.
    """
    t, heads, head_dim = q.shape
    n, kv_heads, _ = k.shape
    if n == 0 or t == 0:
        return torch.zeros(n, dtype=torch.float32, device=k.device)
    if scorer == "sigmoid_mean":
        # Rows of KV group g are (token, query head in the group) pairs: [kv_heads, T * groups, head_dim].
        q3 = q.to(k.dtype).reshape(t, kv_heads, heads // kv_heads, head_dim).permute(1, 0, 2, 3)
        return _launch(q3.reshape(kv_heads, -1, head_dim), k, 1.0 / math.sqrt(head_dim), 1.0 / (t * heads), False)
    if scorer == "max_logit":
        return _launch(_folded_query(q, k), k, 1.0, 1.0, max_mode=True)
    if scorer == "max_z":
        return max_z_scores(q, [k])
    raise ValueError(f"the scoring kernel has no scorer {scorer!r}")


def logit_moments(q: torch.Tensor, k: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(n, mean [T], M2 [T]) of each query token's head-mean logits over the n candidates (M2: summed squared
    deviations), without materialising the [T, n] logits. Tiles are merged with Chan's parallel formula.
    """
    n = k.shape[0]
    t = q.shape[0]
    if n == 0:
        zero = torch.zeros(t, dtype=torch.float32, device=k.device)
        return 0, zero, zero.clone()
    q3, k3, meta = _prepare(_folded_query(q, k), k)
    tiles = triton.cdiv(n, BLOCK_N)
    mean = torch.empty(tiles, t, dtype=torch.float32, device=k.device)
    m2 = torch.empty_like(mean)
    _moments_kernel[(tiles,)](
        q3, k3, mean, m2, n, t, k3.shape[2], k3.shape[1],
        q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), **meta,
    )  # fmt: skip
    counts = torch.full((tiles, 1), float(BLOCK_N), device=k.device)
    counts[-1] = n - (tiles - 1) * BLOCK_N
    return n, *merge_moments(counts, mean, m2)


def merge_moments(counts: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan et al.: merge per-group (count [G, 1], mean [G, T], M2 [G, T]) into the whole set's (mean, M2)."""
    total = counts.sum()
    grand = (counts * mean).sum(dim=0) / total
    return grand, m2.sum(dim=0) + (counts * (mean - grand) ** 2).sum(dim=0)


def max_z_scores(q: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """Kernel version of retrieval's max_z over candidates split into parts (the engine's LTM, staging, ...).

    Each query token's head-mean logits are standardised over all parts' candidates together (unbiased std
    plus 1e-6, as retrieval.max_standardized), then the best token counts: two passes over the keys, one for
    the moments and one for the scores, instead of a [T, n] logit matrix. Returns [sum of n] float32.
    """
    total = sum(int(k.shape[0]) for k in parts)
    if total < 2 or q.shape[0] == 0:
        # One candidate has no spread: max_standardized then keeps the raw head-mean logit.
        return torch.cat([token_scores(q, k, "max_logit") for k in parts]) if parts else torch.zeros(0)
    moments = [logit_moments(q, k) for k in parts if k.shape[0]]
    counts = torch.tensor([[float(c)] for c, _, _ in moments], device=parts[0].device)
    mean, m2 = merge_moments(counts, torch.stack([m for _, m, _ in moments]), torch.stack([s for _, _, s in moments]))
    inv_std = 1.0 / ((m2 / (total - 1)).sqrt() + 1e-6)
    return torch.cat([_launch(_folded_query(q, k), k, 1.0, 1.0, True, (mean, inv_std)) for k in parts])


def projector_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Kernel version of retrieval.projector_scores: mean_t sigmoid(q[t].keys[j]). q: [T, d]; keys: [n, d]."""
    if keys.shape[0] == 0 or q.shape[0] == 0:
        return torch.zeros(keys.shape[0], dtype=torch.float32, device=keys.device)
    q3 = q.to(keys.dtype).unsqueeze(0)  # one "KV head" whose rows are the query tokens
    return _launch(q3, keys.unsqueeze(1), 1.0, 1.0 / q.shape[0], max_mode=False)


def score_top_k(q: torch.Tensor, k: torch.Tensor, scorer: str, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) of the `top` best candidates, best first: fused scores, then one torch.topk.

    The per-candidate scores are 4 bytes against the 2 * kv_heads * head_dim bytes of each key the kernel
    reads, so a separate top-k pass over them costs little next to the scoring itself.
    """
    scores = token_scores(q, k, scorer)
    return torch.topk(scores, min(top, scores.numel()))
