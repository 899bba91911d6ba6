"""Readable PyTorch references for the Triton kernels in this package (Liger-Kernel habit: kernel beside reference).

Each function states the math of one kernel in plain torch, with no chunking or tricks, so a reader can check
the kernel against the definition and the tests can check it numerically on fresh random inputs. They compute
in float32 whatever the input dtype, which is also what the kernels do (bf16 inputs are widened on load).

- `sigmoid_mean_scores`: SPEC 4.5's long-term score over per-head pre-RoPE queries and keys (GQA).
- `max_logit_scores`: the head-mean logit of the best-matching query token (retrieval.py's `max_logit`).
- `max_z_scores`: the same logits standardised per query token over all candidates first (`max_z`).
- `projector_sigmoid_mean`: SPEC 4.5 with a trained retriever's projections (retrieval.py's `projector_scores`).
- `prefix_causal_attention`: attention of T prompt tokens over P memory-prefix keys plus themselves, causally.
"""

from __future__ import annotations

import math

import torch


def _logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[T, heads, n] float32 q.k/sqrt(head_dim), query head h against KV head h // (heads / kv_heads)."""
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    k_per_head = k.float().repeat_interleave(heads // kv_heads, dim=1)  # [n, heads, head_dim]
    return torch.einsum("thd,nhd->thn", q.float(), k_per_head) / math.sqrt(head_dim)


def sigmoid_mean_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """score[j] = mean over query tokens t and query heads h of sigmoid(q[t,h].k[j,h//G] / sqrt(head_dim)).

    q: [T, heads, head_dim]; k: [n, kv_heads, head_dim]. Returns [n] float32.
    """
    return torch.sigmoid(_logits(q, k)).mean(dim=(0, 1))


def max_logit_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """score[j] = max over query tokens t of the mean over heads h of q[t,h].k[j,h//G] / sqrt(head_dim)."""
    return _logits(q, k).mean(dim=1).amax(dim=0)


def max_z_scores(q: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """Each query token's head-mean logits standardised over all candidates of all parts, best token kept.

    z[t, j] = (l[t, j] - mean_j l[t, :]) / (std_j l[t, :] + 1e-6), unbiased std; score[j] = max_t z[t, j].
    With fewer than two candidates there is no spread and the raw logit is kept. Returns [sum of n] float32.
    """
    logits = torch.cat([_logits(q, k).mean(dim=1) for k in parts], dim=1)  # [T, n]
    if logits.shape[1] < 2:
        return logits.amax(dim=0)
    z = (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + 1e-6)
    return z.amax(dim=0)


def projector_sigmoid_mean(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """score[j] = mean over t of sigmoid(q[t].keys[j]), unscaled. q: [T, d]; keys: [n, d]. Returns [n] float32."""
    return torch.sigmoid(q.float() @ keys.float().T).mean(dim=0)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k best scores, best first; k is clipped to the number of candidates."""
    return torch.topk(scores, min(k, scores.numel()))


def prefix_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention where query i of T sees keys 0 .. P+i of S = P+T (all prefix keys, causal after).

    q: [B, heads, T, head_dim]; k, v: [B, kv_heads, S, head_dim] with S >= T. Returns [B, heads, T, head_dim]
    in q's dtype. The scale defaults to 1/sqrt(head_dim). This is the mask a stock causal model applies when its
    cache already holds the P memory-prefix tokens, which is how the engine reads memory.
    """
    t, head_dim = q.shape[2], q.shape[3]
    heads, s = q.shape[1], k.shape[2]
    groups = heads // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    kf = k.float().repeat_interleave(groups, dim=1)  # [B, heads, S, head_dim]
    vf = v.float().repeat_interleave(groups, dim=1)
    logits = torch.einsum("bhtd,bhsd->bhts", q.float(), kf) * scale
    prefix = s - t
    allowed = torch.arange(s)[None, :] <= prefix + torch.arange(t)[:, None]  # [T, S]
    logits = logits.masked_fill(~allowed.to(logits.device), -math.inf)
    return torch.einsum("bhts,bhsd->bhtd", torch.softmax(logits, dim=-1), vf).to(q.dtype)
