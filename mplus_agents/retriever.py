"""The co-trained retriever of M+ (SPEC 2.1, 4.5, 5): per-layer query and key projectors.

M+ scores a long-term token j for a prompt by mean_t sigmoid(f_q(x_t) . f_k(m_j)), where x_t is the layer's
normalised input at prompt token t and m_j the normalised memory vector. Both projectors are two linear layers
with SiLU between and no bias, so their state-dict names are `.0.weight` and `.2.weight` as in the release.

The `output` source feeds them what M+ feeds them: the layer's input norm of the memory vector (`key_input =
"hidden"`). The `input` source stores no hidden states, only each token's exact pre-RoPE key and value, so its
key projector reads those (`key_input = "kv"`, the flattened key and value concatenated); its query projector
reads the prompt's normalised hidden states in both cases. A retriever is weights, shared by every user; the
keys it produces (`score_key`) are per-user state.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

KeyInput = Literal["hidden", "kv"]


class Projector(nn.Sequential):
    """Linear(d_in -> 2*dim) -> SiLU -> Linear(2*dim -> dim), no bias (SPEC 2.1, `num_selector_layers=2`)."""

    def __init__(self, d_in: int, dim: int) -> None:
        super().__init__(nn.Linear(d_in, 2 * dim, bias=False), nn.SiLU(), nn.Linear(2 * dim, dim, bias=False))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Apply in the projector's own dtype (callers pass model-dtype activations)."""
        return self(x.to(next(self.parameters()).dtype))  # type: ignore[no-any-return]


class Retriever(nn.Module):
    """One query and one key projector per decoder layer (plus M+'s optional encoder-query projector)."""

    def __init__(
        self,
        layers: int,
        query_dim: int,
        key_dim: int,
        dim: int = 256,
        *,
        key_input: KeyInput = "hidden",
        encoder: bool = False,
    ) -> None:
        super().__init__()
        if key_input not in ("hidden", "kv"):
            raise ValueError(f"key_input must be 'hidden' or 'kv', got {key_input!r}")
        self.layers = layers
        self.dim = dim
        self.key_input: KeyInput = key_input
        self.query_proj = nn.ModuleList(Projector(query_dim, dim) for _ in range(layers))
        self.key_proj = nn.ModuleList(Projector(key_dim, dim) for _ in range(layers))
        self.encoder_query_proj = nn.ModuleList(Projector(query_dim, dim) for _ in range(layers)) if encoder else None

    def queries(self, layer: int, normed: torch.Tensor) -> torch.Tensor:
        """f_q of normalised prompt hidden states [T, d] -> [T, dim]."""
        proj: Projector = self.query_proj[layer]  # type: ignore[assignment]
        return proj.project(normed)

    def release_state_dict(self, layers: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Projector weights under the release's names (`model.layers.{i}.self_attn.{proj}.{0,2}.weight`,
        SPEC 6.2), for `layers` (default: all), detached on the CPU."""
        wanted = None if layers is None else set(layers)
        out = {}
        for name, t in self.state_dict().items():
            proj, layer, rest = name.split(".", 2)  # query_proj.{i}.{0,2}.weight
            if wanted is None or int(layer) in wanted:
                out[f"model.layers.{layer}.self_attn.{proj}.{rest}"] = t.detach().cpu().contiguous()
        return out

    def keys(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """f_k of one layer's key features [n, key_dim] (see `key_features`) -> [n, dim]."""
        proj: Projector = self.key_proj[layer]  # type: ignore[assignment]
        return proj.project(features)


def kv_features(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The `input` source's key features: pre-RoPE key and value of each token, flattened and joined [n, 2*kv*hd]."""
    return torch.cat([k.flatten(1), v.flatten(1)], dim=-1)  # flatten, not reshape(n, -1): n may be 0
