"""Triton kernel: fused long-term scoring (SPEC 4.5) and top-k, checked against reference.py.

One program scores a tile of BLOCK_N candidate keys against all query rows: the q.k products, the sigmoid and
the mean over query tokens and heads (or the max over query tokens of the head-mean logit) happen in registers,
so the [T, heads, n] logits never reach memory and each key is read once per KV head. Importing this module
imports triton; the dispatcher (dispatch.py) only does so when the tensors are on CUDA, and the tests do it
under TRITON_INTERPRET=1 on CPU.

Inputs are widened to float32 on load. For bf16/fp16 inputs the products then run as TF32 on tensor cores,
which is exact for them (TF32 holds their mantissas); float32 inputs use IEEE products so scores match torch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_N = 64
"""Candidates per program."""
MAX_BLOCK_R = 32
"""Query rows per inner step; T is small (a prompt's query tokens), so one or two steps cover it."""
MAX_BLOCK_D = 128
"""Feature chunk per dot product: head_dim fits in one chunk, a wide projector dimension takes several."""


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
        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.dot(q, tl.trans(k), input_precision=PRECISION)
    return acc


@triton.jit
def _score_kernel(
    q_ptr,
    k_ptr,
    out_ptr,
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
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """q: [kv_heads, rows, dim] (row r of group g is one query head of one token); k: [n, kv_heads, dim].

    MAX_MODE=False: out[j] = inv_count * sum over g, r of sigmoid(scale * q[g,r].k[j,g]).
    MAX_MODE=True:  out[j] = max over r of sum over g of q[g,r].k[j,g] (head mean and scale folded into q).
    """
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    if MAX_MODE:
        result = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        for r0 in range(0, rows, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rows
            logits = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
            for g in range(0, kv_heads):
                logits += _tile_logits(
                    q_ptr + g * stride_qg, k_ptr + g * stride_kg, offs_r, offs_n, mask_r, mask_n, dim,
                    stride_qr, stride_kn, BLOCK_R, BLOCK_N, BLOCK_D, PRECISION,
                )  # fmt: skip
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


def _block(size: int, cap: int) -> int:
    """Power-of-two tile edge covering `size`, at least 16 (tl.dot's minimum) and at most `cap`."""
    return max(16, min(cap, triton.next_power_of_2(max(size, 1))))


def _launch(q3: torch.Tensor, k3: torch.Tensor, scale: float, inv_count: float, max_mode: bool) -> torch.Tensor:
    """Run the kernel on q3 [kv_heads, rows, dim] and k3 [n, kv_heads, dim] (feature stride 1 for both)."""
    n, kv_heads, dim = k3.shape
    rows = q3.shape[1]
    out = torch.empty(n, dtype=torch.float32, device=k3.device)
    if n == 0:
        return out
    if k3.stride(2) != 1:
        k3 = k3.contiguous()
    q3 = q3.contiguous()
    precision = "ieee" if k3.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(n, BLOCK_N),)
    _score_kernel[grid](
        q3, k3, out, n, rows, dim, kv_heads, q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1),
        scale, inv_count,
        MAX_MODE=max_mode, BLOCK_N=BLOCK_N, BLOCK_R=_block(rows, MAX_BLOCK_R), BLOCK_D=_block(dim, MAX_BLOCK_D),
        PRECISION=precision,
    )  # fmt: skip
    return out


def token_scores(q: torch.Tensor, k: torch.Tensor, scorer: str) -> torch.Tensor:
    """Kernel version of retrieval.token_scores for the `sigmoid_mean` and `max_logit` scorers.

    q: [T, heads, head_dim]; k: [n, kv_heads, head_dim] (any strides with a unit feature stride, e.g. one
    layer of a [L, n, kv_heads, head_dim] store). Returns [n] float32.
    """
    t, heads, head_dim = q.shape
    n, kv_heads, _ = k.shape
    if n == 0 or t == 0:
        return torch.zeros(n, dtype=torch.float32, device=k.device)
    groups = heads // kv_heads
    if scorer == "sigmoid_mean":
        # Rows of KV group g are (token, query head in the group) pairs: [kv_heads, T * groups, head_dim].
        q3 = q.to(k.dtype).reshape(t, kv_heads, groups, head_dim).permute(1, 0, 2, 3).reshape(kv_heads, -1, head_dim)
        return _launch(q3, k, 1.0 / math.sqrt(head_dim), 1.0 / (t * heads), max_mode=False)
    if scorer == "max_logit":
        # The head mean is linear: fold it and the scale into one group-mean query per KV head, as
        # retrieval.head_mean_logits does, so the kernel only sums over KV heads and takes the max over tokens.
        q_bar = q.float().reshape(t, kv_heads, groups, head_dim).mean(dim=2) / (math.sqrt(head_dim) * kv_heads)
        q3 = q_bar.to(k.dtype).permute(1, 0, 2)  # [kv_heads, T, head_dim]
        return _launch(q3, k, 1.0, 1.0, max_mode=True)
    raise ValueError(f"the scoring kernel has no scorer {scorer!r} (it fuses sigmoid_mean and max_logit)")


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
