"""A lean forward pass for Llama-family decoders: decode and injection with few Python-level operations.

On a small model Hugging Face's forward spends most of a decode step outside the matrix products (mask and
cache bookkeeping, module dispatch, output dataclasses); MEASURED.md has SmolLM2 decoding at ~18% of the
memory-bandwidth floor. This module runs the same math as `LlamaDecoderLayer` on the model's own weights
with a preallocated key/value cache, a rotary table computed once by the model's own rotary module, no mask
for single-token steps, and (on CPU) the projections packed once into fused, transposed matrices: a
[1, d] x [d, n] product reads a contiguous [d, n] matrix about 1.5x faster than `F.linear`'s [n, d] on
this machine's MKL, and q/k/v and gate/up become one product each.

Decode steps of an fp32 model on CPU go one step further: the whole step runs in compiled C
(`kernels/cpu_decode.c`, built with the system compiler on first use), whose weight panels stream at close
to the memory bandwidth, about twice as fast as MKL's products here (`benchmarks/speed.py`). The torch step
below is its reference and the path without a compiler, for other dtypes and on CUDA.

It never replaces the stock path for passes that need hooks (reads with retrieval, the `output` source);
`tests/test_fast.py` pins both steps to the stock forward within fp32 tolerance on random tiny models and
SmolLM2. Packed weights (torch's or the compiled step's panels) are copies, the model's size again in RAM;
they are rebuilt when the model's parameters change (`FastDecoder.current`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mplus_agents.hf.arch import Arch
from mplus_agents.kernels import native as native_kernels
from mplus_agents.kernels.cpu_decode import NativeStep, huge_page_zeros

Proj = list[tuple[torch.Tensor, torch.Tensor | None]]
"""One projection as (W^T [d_in, d_out], bias) parts whose outputs are concatenated: one part when packed."""

_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def _proj(x: torch.Tensor, parts: Proj) -> torch.Tensor:
    outs = [x @ w if b is None else torch.addmm(b, x, w) for w, b in parts]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _proj_parts(x: torch.Tensor, parts: Proj, widths: list[int]) -> list[torch.Tensor]:
    """One output per fused module ([q, k, v] or [gate, up]): separate products when the weights are not packed
    (concatenating them only to split again made a 512-token prefill 1.5-2% slower), views of one product when
    they are."""
    if len(parts) == len(widths):
        return [x @ w if b is None else torch.addmm(b, x, w) for w, b in parts]
    return list(_proj(x, parts).split(widths, dim=-1))


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: Proj
    """[q | k | v] for all heads."""
    qk_norm: torch.Tensor | None
    """Qwen3: per-head RMSNorm weights [heads + kv_heads, head_dim] for [q | k]."""
    o: Proj
    gate_up: Proj
    down: Proj


def fingerprint(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version of every parameter: changes when weights are loaded or modules swapped."""
    return tuple((id(p), p._version) for p in model.parameters())


def has_hooks(model: nn.Module) -> bool:
    """Any forward (pre-)hook on the model's modules, or a global module hook."""
    from torch.nn.modules import module as module_mod

    if module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class StaticCache:
    """Preallocated post-RoPE keys and values [L, kv_heads, capacity, head_dim]; `length` positions are filled.

    Each step writes one position in place; a DynamicCache concatenates every layer on every token instead.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        self.k = k
        self.v = v
        self.length = length
        self.scratch: torch.Tensor | None = None
        """Work space of the compiled step (`NativeStep.scratch`), made on its first step."""

    @property
    def capacity(self) -> int:
        return int(self.k.shape[2])

    @classmethod
    def empty(cls, fast: FastDecoder, capacity: int) -> StaticCache:
        s = fast.arch.shapes
        shape = (s.layers, s.kv_heads, capacity, s.head_dim)
        if fast.device.type == "cpu":  # the compiled step streams it: 2 MB pages where the kernel allows
            return cls(huge_page_zeros(shape, fast.dtype), huge_page_zeros(shape, fast.dtype), 0)
        k = torch.zeros(shape, dtype=fast.dtype, device=fast.device)
        return cls(k, torch.zeros_like(k), 0)

    @classmethod
    def from_dynamic(cls, fast: FastDecoder, cache: Any, extra: int) -> StaticCache:
        """Copy a filled Hugging Face DynamicCache ([1, kvh, P, hd] per layer) into room for `extra` more."""
        layers = cache.layers
        length = int(layers[0].keys.shape[2]) if layers and layers[0].keys is not None else 0
        out = cls.empty(fast, length + extra)
        if length:
            for i, layer in enumerate(layers):
                out.k[i, :, :length] = layer.keys[0]
                out.v[i, :, :length] = layer.values[0]
        out.length = length
        return out


class FastDecoder:
    """The decoder's math on raw weights, for one model and dtype. Stateless across calls (thread-safe)."""

    def __init__(
        self, arch: Arch, *, pack: bool | None = None, native: bool | None = None, weights: torch.dtype | None = None
    ) -> None:
        """`native`: the compiled step (None: when available; True: required). `weights=torch.bfloat16` has the
        compiled step read bf16 copies of an fp32 model's matrices (`NativeStep`); it needs the compiled step."""
        if not self.supports(arch):
            raise ValueError(f"{type(arch.model).__name__} is not supported by the fast path")
        self.arch = arch
        model = arch.model
        self.dtype: torch.dtype = arch.dtype
        self.device: torch.device = arch.device
        lib = None
        if native is not False and self.device.type == "cpu" and self.dtype == torch.float32:
            lib = native_kernels.load()
        if lib is None and (native or weights is not None):
            raise RuntimeError(
                "the compiled CPU decode step is not available: it needs an fp32 model on CPU and a C compiler "
                "(and MPLUS_NATIVE not 0)"
            )
        # Decode steps read the compiled step's own panels when it runs, so the torch-side packed copy would
        # only serve injection, whose [512, d] products MKL runs as fast from the model's own weights.
        self.pack = (self.device.type == "cpu" and lib is None) if pack is None else pack
        self.version = fingerprint(model)
        cfg = model.config
        s = arch.shapes
        self.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self.scale = s.head_dim**-0.5
        self.q_width = s.heads * s.head_dim
        self.kv_width = s.kv_heads * s.head_dim
        with torch.no_grad():
            self.layers = [self._layer(block) for block in arch.layers]
            self.embed = model.get_input_embeddings().weight.detach()
            self.norm = model.model.norm.weight.detach()
            self.lm_head = self._parts([model.lm_head])
        empty = torch.empty(0, s.head_dim, dtype=self.dtype, device=self.device)
        self._rope: tuple[torch.Tensor, torch.Tensor] = (empty, empty)
        self.weights = weights
        """The dtype asked for the compiled step's matrices (None: the model's)."""
        self.native: NativeStep | None = None
        """The compiled step (kernels/cpu_decode.c) for fp32 on CPU when a C compiler is there, else None."""
        if lib is not None:
            with torch.no_grad():
                self.native = NativeStep(lib, self, weights or torch.float32)

    @staticmethod
    def supports(arch: Arch) -> bool:
        """True when every module this path bypasses is the stock one (SiLU MLP, RMSNorm) and nothing hooks it.

        Hooks change what a module computes (LoRA adapters are forward hooks, `mplus_agents.lora`), and this
        path never calls the modules, so any hook on the model means the stock path. Call it while no
        temporary engine hooks are attached (under `MPlusLLM.hook_lock`): those would count too.
        """
        if has_hooks(arch.model):
            return False
        cfg = arch.model.config
        if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
            return False
        if type(arch.model.lm_head) is not nn.Linear or type(arch.model.model.norm).__name__ not in _NORMS:
            return False
        for block in arch.layers:
            attn, mlp = block.self_attn, block.mlp
            linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            if any(type(m) is not nn.Linear for m in linears):
                return False
            if any(m.bias is not None for m in linears[3:]):
                return False
            norms = [block.input_layernorm, block.post_attention_layernorm]
            norms += [n for n in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)) if n is not None]
            if any(type(n).__name__ not in _NORMS for n in norms):
                return False
        return True

    def current(self) -> bool:
        """False once the model's parameters were replaced or modified in place (packed copies are stale)."""
        return fingerprint(self.arch.model) == self.version

    # ------------------------------------------------------------------ weights

    def _parts(self, modules: list[nn.Linear]) -> Proj:
        if not self.pack:
            return [(m.weight.detach().t(), None if m.bias is None else m.bias.detach()) for m in modules]
        w = torch.cat([m.weight.detach() for m in modules]).t().contiguous()  # [d_in, sum d_out]
        b = None
        if any(m.bias is not None for m in modules):
            b = torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias.detach() for m in modules])
        return [(w, b)]

    def _layer(self, block: Any) -> _Layer:
        attn, mlp = block.self_attn, block.mlp
        s = self.arch.shapes
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        qk_norm = None
        if qn is not None and kn is not None:
            qk_norm = torch.cat(
                [qn.weight.detach().expand(s.heads, -1), kn.weight.detach().expand(s.kv_heads, -1)]
            ).contiguous()
        return _Layer(
            ln1=block.input_layernorm.weight.detach(),
            ln2=block.post_attention_layernorm.weight.detach(),
            qkv=self._parts([attn.q_proj, attn.k_proj, attn.v_proj]),
            qk_norm=qk_norm,
            o=self._parts([attn.o_proj]),
            gate_up=self._parts([mlp.gate_proj, mlp.up_proj]),
            down=self._parts([mlp.down_proj]),
        )

    # ------------------------------------------------------------------ pieces

    def _rope_table(self, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [positions, head_dim] from the model's rotary module, grown by doubling."""
        table = self._rope
        if upto > table[0].shape[0]:
            n = max(upto, 2 * table[0].shape[0], 256)
            cos, sin = self.arch.rope(torch.arange(n, device=self.device), self.dtype)
            half = cos.shape[-1] // 2
            # rotate_half(x) * sin == roll(x, half) * [-sin_lo, sin_hi]: one roll instead of split/neg/cat.
            table = self._rope = (cos.contiguous(), torch.cat([-sin[:, :half], sin[:, half:]], dim=-1).contiguous())
        return table

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # LlamaRMSNorm's order of operations: normalise in fp32, cast back, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    def _qkv(
        self, lay: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H, hd] and k [T, KV, hd] rotated; pre-RoPE k and v [T, KV, hd] (what memory stores)."""
        s = self.arch.shapes
        t = h.shape[0]
        widths = [self.q_width, self.kv_width, self.kv_width]
        q, k, v = (x.view(t, -1, s.head_dim) for x in _proj_parts(self._rms(h, lay.ln1), lay.qkv, widths))
        if lay.qk_norm is not None:
            q, k = self._rms(q, lay.qk_norm[: s.heads]), self._rms(k, lay.qk_norm[s.heads :])
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        half = s.head_dim // 2
        return q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin, k, v

    def _mlp(self, lay: _Layer, h: torch.Tensor) -> torch.Tensor:
        inter = lay.down[0][0].shape[0]  # down's weight is stored [inter, hidden]
        gate, up = _proj_parts(self._rms(h, lay.ln2), lay.gate_up, [inter, inter])
        return h + _proj(F.silu(gate) * up, lay.down)

    # ------------------------------------------------------------------ passes

    @torch.inference_mode()
    def step(self, cache: StaticCache, token: int, position: int) -> torch.Tensor:
        """Feed one token at `position` after the cache's `length` entries; returns next-token logits [vocab]."""
        s = self.arch.shapes
        n = cache.length
        if n >= cache.capacity:
            raise ValueError(f"static cache full ({cache.capacity} positions)")
        cos_t, sin_t = self._rope_table(position + 1)
        if self.native is not None:
            if cache.scratch is None:
                cache.scratch = self.native.scratch(cache.capacity)
            logits = self.native.step(cache.k, cache.v, n, token, cos_t[position], sin_t[position], cache.scratch)
            cache.length = n + 1
            return logits
        cos, sin = cos_t[position : position + 1], sin_t[position : position + 1]
        h = self.embed[token : token + 1]
        groups = s.heads // s.kv_heads
        for i, lay in enumerate(self.layers):
            q, k, _, v = self._qkv(lay, h, cos, sin)
            cache.k[i, :, n] = k[0]
            cache.v[i, :, n] = v[0]
            # GQA without repeating keys: each KV head serves its `groups` query heads as a length-g batch.
            o = F.scaled_dot_product_attention(
                q.view(1, s.kv_heads, groups, s.head_dim),
                cache.k[i : i + 1, :, : n + 1],
                cache.v[i : i + 1, :, : n + 1],
                scale=self.scale,
            )
            h = h + _proj(o.view(1, -1), lay.o)
            h = self._mlp(lay, h)
        cache.length = n + 1
        return _proj(self._rms(h, self.norm), self.lm_head)[0]

    @torch.no_grad()
    def prefill_kv(
        self, ids: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE keys and values [L, T, kv_heads, head_dim] of `ids` read after a memory prefix.

        `prefix_k`/`prefix_v` [L, P, kv_heads, head_dim] are pre-RoPE at positions 0..P-1; `ids` run at P...
        This is what `Engine.inject_input` captures with hooks on a full forward; the last layer's attention
        output and MLP, the final norm and the LM head never reach a key or value, so they are skipped.
        """
        s = self.arch.shapes
        device = self.device
        ids = ids.to(device).view(-1)
        t, p = int(ids.numel()), int(prefix_k.shape[1])
        cos_t, sin_t = self._rope_table(p + t)
        cos, sin = cos_t[p : p + t], sin_t[p : p + t]
        pcos, psin = cos_t[:p].unsqueeze(1), sin_t[:p].unsqueeze(1)
        h = self.embed[ids]
        mask = torch.ones(t, p + t, dtype=torch.bool, device=device).tril(p)  # prefix + causal chunk
        keys, values = [], []
        for i, lay in enumerate(self.layers):
            q, k_rot, k, v = self._qkv(lay, h, cos, sin)
            keys.append(k)
            values.append(v)
            if i == len(self.layers) - 1:
                break
            pk = prefix_k[i].to(device=device, dtype=self.dtype)
            pk = pk * pcos + pk.roll(s.head_dim // 2, -1) * psin
            kk = torch.cat([pk, k_rot]).transpose(0, 1).unsqueeze(0)  # [1, KV, P+T, hd]
            vv = torch.cat([prefix_v[i].to(device=device, dtype=self.dtype), v]).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), kk, vv, attn_mask=mask, scale=self.scale, enable_gqa=True
            )  # [1, H, T, hd]
            h = h + _proj(o[0].transpose(0, 1).reshape(t, -1), lay.o)
            h = self._mlp(lay, h)
        return torch.stack(keys), torch.stack(values)
