"""int8 storage of long-term memory vectors (issue 7 item 2): symmetric quantisation with one scale per row.

A "row" is the last dimension of a field: one head of one token for keys and values (`[L, n, kv_heads,
head_dim]` -> scales `[L, n, kv_heads]`), one token for memory vectors (`[L, n, d]` -> `[L, n]`).

Why per token *and* per head: key and value norms differ a lot between KV heads of the same layer (a
handful of "massive" channels sit in one head), so a scale shared by the heads of a token would spend the
int8 range of every head on the loudest one. One float32 scale per 64-wide head costs 4 bytes against 64
of data (6%) and keeps the worst-case error at amax_head / 254 per element.

Scores are computed without a full-precision copy of the store: keys are dequantised a chunk at a time
(`SCORE_CHUNK` rows, a bounded temporary) and only the selected rows are dequantised for the prefix.
"""

from __future__ import annotations

import torch

QUANT_DTYPE = torch.int8
QUANT_FIELDS = ("k", "v", "hidden")
"""Fields stored as int8 when the store is quantised; `score_key` (trained retriever keys) stays float."""
SCALE_DTYPE = torch.float32
QMAX = 127


def scale_name(name: str) -> str:
    return f"{name}_scale"


SCALE_FIELDS = tuple(scale_name(n) for n in QUANT_FIELDS)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales over the last dim). Rows of zeros get scale 0 and dequantise to zeros.

    Error bound per element: |x - dequantize(q, s)| <= s / 2 = amax(row) / 254.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = amax / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(QUANT_DTYPE)
    return q, scale.to(SCALE_DTYPE)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `q` [..., d] int8 with scales [...] back to `dtype` (computed in float32, then cast)."""
    return q.to(torch.float32).mul_(scale.to(torch.float32).unsqueeze(-1)).to(dtype)


def is_quantized(t: torch.Tensor | torch.dtype) -> bool:
    """Whether a tensor (or a dtype) is the int8 storage type."""
    return (t if isinstance(t, torch.dtype) else t.dtype) == QUANT_DTYPE
