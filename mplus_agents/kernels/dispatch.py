"""Choose between a Triton kernel and the torch path, with one warning when a user loses the kernel.

Kernels run only on CUDA tensors with triton installed. CPU tensors always take torch, silently: that is the
intended CPU path, not a fallback (triton on CPU only runs under TRITON_INTERPRET=1, thousands of times
slower; MEASURED.md). CUDA tensors without triton take torch too, and that one case warns once per process,
because the user asked for a GPU and installing the `triton` extra would give them the fused kernels.
Setting MPLUS_KERNELS=torch forces the torch path everywhere (for comparisons and debugging).

The functions return None when the caller should run its own torch path, so retrieval.py keeps its
reference code in one place and only asks here first.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Literal

import torch

Backend = Literal["triton", "torch"]

ATTENTION_NAME = "mplus_prefix_causal"
"""The transformers attention implementation name under which attention.register_hf_attention registers the kernel."""

_warned = False


def triton_installed() -> bool:
    """Whether `import triton` would succeed, without importing it (importing it costs about a second)."""
    return importlib.util.find_spec("triton") is not None


def choose_backend(*tensors: torch.Tensor) -> Backend:
    """"triton" when every tensor is on CUDA and triton is installed (and not disabled), else "torch"."""
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    return backend_for(on_cuda=on_cuda, installed=on_cuda and triton_installed())


def backend_for(*, on_cuda: bool, installed: bool) -> Backend:
    """The decision itself, apart from the tensors, warning once for CUDA without triton."""
    global _warned
    if not on_cuda or os.environ.get("MPLUS_KERNELS", "").lower() == "torch":
        return "torch"
    if installed:
        return "triton"
    if not _warned:
        _warned = True
        warnings.warn(
            "mplus_agents: tensors are on CUDA but triton is not installed, so long-term scoring runs torch "
            "instead of the fused Triton kernels; install them with `pip install 'mplus-agents[triton]'`.",
            RuntimeWarning,
            stacklevel=4,
        )
    return "torch"


def token_scores(q: torch.Tensor, k: torch.Tensor, scorer: str) -> torch.Tensor | None:
    """The fused kernel's retrieval.token_scores, or None when the caller should use torch."""
    if scorer not in ("sigmoid_mean", "max_logit", "max_z") or choose_backend(q, k) != "triton":
        return None
    from mplus_agents.kernels import scoring

    return scoring.token_scores(q, k, scorer)


def max_z_scores(q: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The two-pass kernel's max_z over candidates split into parts, or None when the caller should use torch."""
    if not parts or choose_backend(q, *parts) != "triton":
        return None
    from mplus_agents.kernels import scoring

    return scoring.max_z_scores(q, parts)


def projector_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """The fused kernel's retrieval.projector_scores, or None when the caller should use torch."""
    if choose_backend(q, keys) != "triton":
        return None
    from mplus_agents.kernels import scoring

    return scoring.projector_scores(q, keys)


def prefix_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Prompt-over-prefix attention: the Triton kernel on CUDA, torch's SDPA otherwise.

    Shapes as in reference.prefix_causal_attention ([B, heads, T, hd] queries, [B, kv_heads, S, hd] keys
    and values, the first S - T keys a prefix every query sees).
    """
    if choose_backend(q, k, v) == "triton":
        from mplus_agents.kernels import attention

        return attention.prefix_causal_attention(q, k, v, scale)
    t, s = q.shape[2], k.shape[2]
    allowed = torch.arange(s, device=q.device)[None, :] <= (s - t) + torch.arange(t, device=q.device)[:, None]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
