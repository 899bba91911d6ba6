"""The compiled CPU decode step (`cpu_decode.c`) on a model's weights: packing, the C structs, the calls.

`NativeStep` holds the weights in the kernel's panel layout (a copy, the model's size again in RAM, as the
torch fast path's packed copy was) and runs `FastDecoder.step`'s math in one call per token. `pack_panel`,
`gemv`, `rms` and `attend` expose the kernel's pieces so tests can compare each with torch on random inputs.
Only fp32 on CPU; FastDecoder falls back to its torch step for anything else.
"""

from __future__ import annotations

import ctypes
import math
import mmap
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mplus_agents.fast import FastDecoder

ROWS = 8
"""MP_R in cpu_decode.c: output rows per panel."""
LANES = 16
"""MP_V in cpu_decode.c: floats per slice."""


def _pad(n: int, m: int) -> int:
    return -(-n // m) * m


WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1}
"""Panel dtypes the kernel reads (mp_model.wtype)."""


def pack_panel(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] (nn.Linear's layout) -> [ceil(N/8), ceil(K/16), 8, 16] in `dtype` (fp32 or bf16), zero-padded.

    Eight output rows are interleaved slice by slice, so a thread reading one panel reads memory strictly in
    order while keeping eight independent dot products in flight.
    """
    n, k = w.shape
    padded = w.new_zeros(_pad(n, ROWS), _pad(k, LANES), dtype=dtype)
    padded[:n, :k] = w
    return padded.view(-1, ROWS, padded.shape[1] // LANES, LANES).transpose(1, 2).contiguous()


def panel_numel(n: int, k: int) -> int:
    """Elements of pack_panel's result for an [n, k] matrix."""
    return _pad(n, ROWS) * _pad(k, LANES)


def _anonymous_map(nbytes: int, huge_pages: bool) -> tuple[mmap.mmap, bool]:
    """A zeroed private mapping of `nbytes`, and whether the kernel took the advice to back it with 2 MB pages."""
    # Private: a shared anonymous mapping is shmem, whose huge pages follow another (usually off) setting.
    mapping = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
            return mapping, True
        except OSError:
            pass
    return mapping, False


def huge_page_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape, dtype) on the CPU, in its own mapping on 2 MB pages where the kernel allows.

    For the decode step's key/value cache: attention streams it like the weights, and on 4 KB pages long
    contexts read it measurably slower (PanelArena says why). The tensor keeps its mapping alive.
    """
    numel = math.prod(shape)
    if numel == 0:  # nothing to map (torch.frombuffer refuses an empty view)
        return torch.zeros(shape, dtype=dtype)
    mapping, _ = _anonymous_map(numel * dtype.itemsize, huge_pages=True)
    return torch.frombuffer(mapping, dtype=dtype, count=numel).view(shape)


class PanelArena:
    """One anonymous mapping for all of a model's panels, asked (Linux MADV_HUGEPAGE) for 2 MB pages.

    Why: the hardware prefetchers stop at every 4 KB page boundary and each page costs a TLB walk, so a
    bandwidth-bound stream over 4 KB pages runs about a quarter slower than over 2 MB pages (measured here with
    transparent huge pages in `madvise` mode, the common default: 24 vs 32 GB/s for the same panel product).
    Small separate tensors could not use 2 MB pages at all; one mapping holds everything. Where the advice is
    unknown or refused, the pages are ordinary ones and nothing else changes.
    """

    ALIGN = 64

    def __init__(self, nbytes: int, huge_pages: bool = True) -> None:
        self._map, self.huge_pages = _anonymous_map(nbytes, huge_pages)
        self.buffer = torch.frombuffer(self._map, dtype=torch.uint8)
        self.used = 0

    def pack(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """pack_panel(w, dtype), written into the arena."""
        n, k = w.shape
        size = panel_numel(n, k) * dtype.itemsize
        start = _pad(self.used, self.ALIGN)
        if start + size > self.buffer.numel():
            raise ValueError(f"panel arena full: {start + size} of {self.buffer.numel()} bytes")
        out = self.buffer[start : start + size].view(dtype)
        out.copy_(pack_panel(w, dtype).reshape(-1))
        self.used = start + size
        return out


def padded_input(x: torch.Tensor) -> torch.Tensor:
    """A kernel input vector: fp32, contiguous, zero lanes up to a multiple of 16."""
    out = x.new_zeros(_pad(x.numel(), LANES), dtype=torch.float32)
    out[: x.numel()] = x.reshape(-1)
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Layer(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_void_p) for name in ("ln1", "ln2", "qkv", "qkv_bias", "qk_norm", "o", "gate_up", "down")
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *[
            (name, ctypes.c_long)
            for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "inter", "vocab", "wtype")
        ],
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("embed", ctypes.c_void_p),
        ("norm", ctypes.c_void_p),
        ("lm_head", ctypes.c_void_p),
        ("layer", ctypes.POINTER(_Layer)),
    ]


class NativeStep:
    """One model's weights packed for `mp_step`; stateless across calls like FastDecoder itself.

    `weights=torch.bfloat16` packs the matrices (projections and LM head) in bf16: half the bytes per step, so
    about twice the speed of a bandwidth-bound decode, for the rounding of every weight to 8 mantissa bits
    (norms, embeddings, activations and sums stay fp32).
    """

    def __init__(
        self, lib: ctypes.CDLL, fast: FastDecoder, weights: torch.dtype = torch.float32, *, huge_pages: bool = True
    ) -> None:
        if weights not in WEIGHT_TYPES:
            raise ValueError(f"the compiled step reads float32 or bfloat16 weights, not {weights}")
        self.lib = lib
        self.weights = weights
        arch = fast.arch
        model = arch.model
        s = arch.shapes
        self.vocab = int(model.lm_head.out_features)  # logits; the embedding rows are only looked up
        keep: list[torch.Tensor] = []
        linears = [
            child for block in arch.layers for part in (block.self_attn, block.mlp) for child in part.children()
            if isinstance(child, torch.nn.Linear)
        ] + [model.lm_head]
        nbytes = sum(panel_numel(m.out_features, m.in_features) for m in linears) * weights.itemsize
        # Panels of fused projections pad less than their parts; the per-panel alignment needs a little more.
        self.arena = PanelArena(nbytes + PanelArena.ALIGN * (len(linears) + 1), huge_pages)

        def hold(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            t = t.detach().to(torch.float32).contiguous()
            keep.append(t)
            return t.data_ptr()

        def panel(*modules: torch.nn.Linear) -> int | None:
            return self.arena.pack(torch.cat([m.weight.detach() for m in modules]), weights).data_ptr()

        layers = (_Layer * s.layers)()
        inter = 0
        for i, block in enumerate(arch.layers):
            attn, mlp = block.self_attn, block.mlp
            inter = int(mlp.gate_proj.out_features)
            lay = fast.layers[i]
            bias = None
            if any(m.bias is not None for m in (attn.q_proj, attn.k_proj, attn.v_proj)):
                bias = torch.cat(
                    [m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                     for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
                )
            layers[i] = _Layer(
                hold(lay.ln1), hold(lay.ln2), panel(attn.q_proj, attn.k_proj, attn.v_proj), hold(bias),
                hold(lay.qk_norm), panel(attn.o_proj), panel(mlp.gate_proj, mlp.up_proj), panel(mlp.down_proj),
            )
        self.model = _Model(
            s.layers, s.hidden_size, s.heads, s.kv_heads, s.head_dim, inter, self.vocab, WEIGHT_TYPES[weights],
            fast.eps, fast.scale,
            hold(fast.embed), hold(fast.norm), panel(model.lm_head), layers,
        )
        self._layers = layers
        self._keep = keep

    def scratch(self, capacity: int) -> torch.Tensor:
        """Work space for a cache of `capacity` positions: the products' shared outputs and attention's partial
        results (the vectors whose pad lanes must be zero live on each thread's stack, zeroed per step)."""
        return torch.zeros(int(self.lib.mp_scratch_floats(ctypes.byref(self.model), capacity)))

    def step(
        self, k: torch.Tensor, v: torch.Tensor, length: int, token: int, cos: torch.Tensor, sin: torch.Tensor,
        scratch: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [vocab] for `token` after `length` cached positions; writes its k/v at index `length`.

        k, v: the static cache [L, kv_heads, capacity, head_dim] (fp32, contiguous); cos, sin: the token's
        rotary row [head_dim] (sin with its first half negated, FastDecoder's table).
        """
        if not (k.is_contiguous() and v.is_contiguous() and k.dtype == v.dtype == torch.float32):
            raise ValueError("the compiled step needs a contiguous fp32 static cache")
        logits = torch.empty(_pad(self.vocab, ROWS))
        self.lib.mp_step(
            ctypes.byref(self.model), k.data_ptr(), v.data_ptr(), int(k.shape[2]), length, token,
            cos.data_ptr(), sin.data_ptr(), logits.data_ptr(), scratch.data_ptr(),
        )
        return logits[: self.vocab]


# ---------------------------------------------------------------------------------------------- pieces, for tests


def gemv(
    lib: ctypes.CDLL, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None,
    weights: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The kernel's panel product: x [K] . w[N, K]^T (+ bias) -> [N], reading w packed in `weights`."""
    n, k = w.shape
    y = torch.empty(_pad(n, ROWS))
    b = None if bias is None else bias.to(torch.float32).contiguous()
    panel, xp = pack_panel(w, weights), padded_input(x)  # named: a temporary would be freed before the call
    product = lib.mp_gemv_bf16 if weights == torch.bfloat16 else lib.mp_gemv
    product(panel.data_ptr(), xp.data_ptr(), _ptr(b), y.data_ptr(), n, k)
    return y[:n]


def rms(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The kernel's RMSNorm of one vector."""
    x, w = x.float().contiguous(), w.float().contiguous()
    out = torch.empty_like(x)
    lib.mp_rms(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.numel(), eps)
    return out


def exp(lib: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    """The kernel's vectorised exponential (softmax and SiLU use it) of a flat fp32 tensor."""
    x = x.float().contiguous()
    out = torch.empty_like(x)
    lib.mp_exp_floats(x.data_ptr(), out.data_ptr(), x.numel())
    return out


def attend(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
    """The kernel's attention of one token's queries q [H, hd] over k, v [KV, capacity, hd] (first `length`)."""
    heads, hd = q.shape
    kv, cap, _ = k.shape
    out = torch.empty(heads, hd)
    work = torch.empty(int(lib.mp_attend_floats(heads, hd, cap)))
    q, k, v = q.float().contiguous(), k.float().contiguous(), v.float().contiguous()
    lib.mp_attend(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), work.data_ptr(), heads, kv, hd, cap, length,
        hd**-0.5,
    )
    return out


def reference_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
    """torch's SDPA on the same inputs, grouped-query as FastDecoder.step calls it."""
    heads, hd = q.shape
    kv = k.shape[0]
    o = F.scaled_dot_product_attention(
        q.view(1, kv, heads // kv, hd), k[None, :, :length], v[None, :, :length], scale=hd**-0.5
    )
    return o.view(heads, hd)
