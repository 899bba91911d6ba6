"""Triton kernel: attention of a prompt over a memory prefix plus itself, causally (forward only).

Query i of the T prompt tokens sees all P prefix keys and prompt keys 0..i, i.e. key j iff j <= P + i with
S = P + T keys; heads share KV heads in GQA groups (query head h reads KV head h // (heads / kv_heads)); scale
1/sqrt(head_dim) unless given. This is the read of SPEC 4.5/7: the engine puts the retrieved long-term tokens
and the short-term pool in the cache as a prefix and runs the prompt over it. The reference is
reference.prefix_causal_attention.

The kernel is a flash-attention-style forward: one program per (block of BLOCK_M queries, batch, head) streams
key/value blocks with an online softmax, stopping at the last key its queries may see. Inputs are widened to
float32 on load: with bf16/fp16 inputs the dot products run as TF32, exact for q.k (TF32 holds their
mantissas) while the softmax weights are rounded to TF32 for the product with V (flash-attention rounds them
to bf16); float32 inputs use IEEE products throughout.

`hf_attention` adapts it to transformers' AttentionInterface; `register_hf_attention()` registers it under a
new name (never overwriting a stock one) for models loaded with `attn_implementation=ATTENTION_NAME`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("mplus_agents.kernels needs triton: pip install 'mplus-agents[triton]'") from exc

from mplus_agents.kernels.dispatch import ATTENTION_NAME

BLOCK_M = 32
"""Queries per program."""
BLOCK_N = 32
"""Keys per inner step."""


@triton.jit
def _prefix_causal_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_ot,
    heads,
    groups,
    t,
    s,
    dim,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)  # int64 base offsets: batch * stride can pass 2**31 elements
    h = (pid_bh % heads).to(tl.int64)
    kvh = h // groups
    prefix = s - t
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < t
    mask_d = offs_d < dim
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # The last query of this block sees keys up to prefix + its index; nothing later is read.
    end = tl.minimum(s, prefix + (pid_m + 1) * BLOCK_M)
    for s0 in range(0, end, BLOCK_N):
        offs_n = s0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < s
        kt = tl.load(
            k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
        ).to(tl.float32)
        logits = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale
        allowed = (offs_n[None, :] <= prefix + offs_m[:, None]) & mask_n[None, :]
        logits = tl.where(allowed, logits, float("-inf"))
        # Key 0 is visible to every query, so m_i is finite after the first block and no row divides by zero.
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        p = tl.exp(logits - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        vt = tl.load(
            v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
        ).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def launch_meta(dim: int, dtype: torch.dtype) -> dict[str, object]:
    """The compile-time tile parameters for head_dim `dim` and inputs of `dtype` (the whole head_dim in one tile)."""
    return {
        "BLOCK_M": BLOCK_M,
        "BLOCK_N": BLOCK_N,
        "BLOCK_D": max(16, triton.next_power_of_2(dim)),
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def prefix_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Kernel version of reference.prefix_causal_attention.

    q: [B, heads, T, head_dim]; k, v: [B, kv_heads, S, head_dim], S >= T (the first S - T keys are the
    prefix). Any strides with a unit feature stride. Returns [B, heads, T, head_dim] in q's dtype.
    """
    batch, heads, t, dim = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    if s < t:
        raise ValueError(f"{s} keys cannot hold a causal block of {t} queries")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not split into {kv_heads} KV heads")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(batch, heads, t, dim, dtype=q.dtype, device=q.device)
    if t == 0 or batch == 0:
        return out
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    grid = (triton.cdiv(t, BLOCK_M), batch * heads)
    _prefix_causal_kernel[grid](
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, heads // kv_heads, t, s, dim, scale,
        **launch_meta(dim, q.dtype),
    )  # fmt: skip
    return out


def hf_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers AttentionInterface function: query [B, heads, T, hd], key/value [B, kv_heads, S, hd].

    Returns ([B, T, heads, hd], None) like the stock sdpa function. Registered with transformers' flash-attention
    mask function, which passes attention_mask=None unless the batch has padding. Padding, dropout, sliding
    windows, soft-capping and non-causal layers are not what this kernel computes, so they raise rather than
    return wrong numbers.
    """
    if attention_mask is not None:
        raise NotImplementedError(f"{ATTENTION_NAME} attention has no padding mask; use attn_implementation='sdpa'")
    if dropout and module.training:
        raise NotImplementedError(f"{ATTENTION_NAME} attention is forward-only, without dropout")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError(f"{ATTENTION_NAME} attention has no sliding window or soft-capping")
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise NotImplementedError(f"{ATTENTION_NAME} attention is causal (over a prefix); this layer is not")
    out = prefix_causal_attention(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def register_hf_attention() -> str:
    """Register the kernel (and the flash-attention mask function it expects) under ATTENTION_NAME; returns it.

    Use: `register_hf_attention(); AutoModelForCausalLM.from_pretrained(..., attn_implementation=ATTENTION_NAME)`
    or `model.set_attn_implementation(ATTENTION_NAME)`. Idempotent; never replaces a stock implementation.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, hf_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    return ATTENTION_NAME
