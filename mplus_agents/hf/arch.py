"""The only place that knows Hugging Face decoder internals (DESIGN 4).

Everything the engine needs from a model goes through `Arch`: the decoder layers, how a layer turns hidden
states into pre-RoPE queries, keys and values, and the rotary embedding. `tests/test_transformers_contract.py`
pins each of these internals so a transformers upgrade that moves one fails loudly there, not silently in
recall.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from mplus_agents.errors import UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Llama-family decoders with full attention in every layer. SmolLM2 is `llama`."""


@dataclass(frozen=True)
class Shapes:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


def check_supported(model: nn.Module) -> None:
    """Refuse models whose attention cannot take a memory prefix unchanged."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    sliding = getattr(config, "sliding_window", None)
    uses_sliding = getattr(config, "use_sliding_window", sliding is not None)
    if layer_types != {"full_attention"} or (sliding is not None and uses_sliding):
        raise UnsupportedModelError(
            f"{model_type} with sliding-window attention is not supported: a sliding window would hide the "
            "memory prefix from later tokens. Load it with sliding_window=None if the model allows full attention."
        )
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise UnsupportedModelError(f"{type(model).__name__} has no `model.layers`; expected a *ForCausalLM model")


class Arch:
    """Per-architecture access to a Llama-family causal LM."""

    def __init__(self, model: nn.Module) -> None:
        check_supported(model)
        # Hugging Face submodules are reached by attribute; typed Any because nn.Module.__getattr__ is not.
        self.model: Any = cast(Any, model)
        cfg = self.model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.shapes = Shapes(
            layers=cfg.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            hidden_size=cfg.hidden_size,
        )

    @property
    def layers(self) -> Any:
        return self.model.model.layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def query_module(self, layer: int) -> Any:
        """Module whose output is the pre-RoPE query (q_norm for Qwen3, q_proj otherwise)."""
        attn = self.layers[layer].self_attn
        return getattr(attn, "q_norm", None) or attn.q_proj

    def key_module(self, layer: int) -> Any:
        """Module whose output is the pre-RoPE key (k_norm for Qwen3, k_proj otherwise)."""
        attn = self.layers[layer].self_attn
        return getattr(attn, "k_norm", None) or attn.k_proj

    def value_module(self, layer: int) -> Any:
        return self.layers[layer].self_attn.v_proj

    def q_from_normed(self, layer: int, normed: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE queries [n, heads, head_dim] from already normalised hidden states [n, d]."""
        attn = self.layers[layer].self_attn
        q = attn.q_proj(normed).reshape(-1, self.shapes.heads, self.shapes.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(q)
        return q

    def kv_from_hidden(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE keys and values [n, kv_heads, head_dim] that layer `layer` computes for `hidden` [n, d].

        This is how a memory vector of the `output` source becomes a prefix entry (SPEC 2.3): the layer's own
        input norm, then its K/V projections.
        """
        block = self.layers[layer]
        attn = block.self_attn
        normed = block.input_layernorm(hidden)
        k = attn.k_proj(normed).reshape(-1, self.shapes.kv_heads, self.shapes.head_dim)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        v = attn.v_proj(normed).reshape(-1, self.shapes.kv_heads, self.shapes.head_dim)
        return k, v

    def kv_all_layers(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`kv_from_hidden` in every layer for per-layer memory vectors [L, n, d] -> keys, values [L, n, kv, hd]."""
        kv = [self.kv_from_hidden(layer, hidden[layer]) for layer in range(hidden.shape[0])]
        return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])

    def normed(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers[layer].input_layernorm(hidden)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [P, head_dim] from the model's own rotary module (so llama3/linear scaling apply)."""
        rotary = self.model.model.rotary_emb
        probe = torch.empty(1, dtype=dtype, device=positions.device)
        cos, sin = rotary(probe, positions.view(1, -1))
        return cos[0], sin[0]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [P, heads, head_dim] by per-position cos/sin [P, head_dim], exactly as Llama attention does."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin
