"""What a stored memory must agree on with the model that reads it (DESIGN 6).

Latent memory is keys and values in one model's attention space: another model, or the same architecture
with other weights, would read noise. So every stored memory records a fingerprint and `MemoryStore.open`
compares it with the model in hand. The fields that decide compatibility are in `COMPATIBILITY_FIELDS`;
the rest (name, library version) are kept to explain a refusal.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from mplus_agents.model import MPlusLLM

VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_model_name_or_path",
        "_commit_hash",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
    }
)
"""Config keys that record where or how a model was loaded, not what it computes."""

COMPATIBILITY_FIELDS = (
    "config_sha256",
    "weights_sha256",
    "tokenizer_class",
    "vocab_size",
    "layers",
    "kv_heads",
    "head_dim",
)

SAMPLES_PER_PARAMETER = 1024

_cache: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _named_weights(llm: MPlusLLM) -> dict[str, torch.Tensor]:
    """The base model's parameters plus the M+ additions (adapters, retriever, BOS vectors, e_new).

    Two checkpoints can share a backbone and differ only in what M+ adds on top; a memory written under one
    must not be read under the other, so the additions are part of the fingerprint.
    """
    out: dict[str, torch.Tensor] = dict(llm.model.named_parameters())
    extra = llm.engine.weights
    for prefix, module in (("mplus.lora", extra.adapters), ("mplus.retriever", extra.retriever)):
        if module is not None:
            out.update({f"{prefix}.{name}": p for name, p in module.named_parameters()})
    for name, t in (("mplus.bos", extra.bos), ("mplus.new_memory_emb", extra.new_memory_emb)):
        if t is not None:
            out[name] = t
    return out


def _weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """A hash of a strided sample of every parameter, rounded to bfloat16.

    Hashing every weight of a multi-GB model on each open would cost seconds; a fine-tune or another
    checkpoint changes essentially every weight, so a sample of each tensor tells them apart. The bf16
    rounding makes the same checkpoint loaded in fp32 or bf16 agree (bf16 storage of fp32 weights is the
    same rounding).
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(weights.items(), key=lambda item: item[0]):
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLES_PER_PARAMETER)
            sample = flat[::step][:SAMPLES_PER_PARAMETER].to("cpu", torch.bfloat16).view(torch.int16)
            h.update(f"{name}:{list(p.shape)}\n".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _config_sha256(llm: MPlusLLM) -> str:
    config = json.loads(cast(Any, llm.model).config.to_json_string())
    stable = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def model_fingerprint(llm: MPlusLLM) -> dict[str, Any]:
    """The fingerprint of `llm` (computed once per model object)."""
    cached = _cache.get(llm)
    if cached is not None:
        return dict(cached)
    from mplus_agents import __version__

    shapes = llm.engine.arch.shapes
    tok = llm.tokenizer
    vocab = getattr(tok, "vocab_size", None)
    if not isinstance(vocab, int):
        vocab = int(cast(Any, llm.model).config.vocab_size)
    fp: dict[str, Any] = {
        "name": llm.name,
        "config_sha256": _config_sha256(llm),
        "weights_sha256": _weights_sha256(_named_weights(llm)),
        "tokenizer_class": type(tok).__name__,
        "vocab_size": vocab,
        "layers": shapes.layers,
        "kv_heads": shapes.kv_heads,
        "head_dim": shapes.head_dim,
        "library_version": __version__,
    }
    _cache[llm] = fp
    return dict(fp)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable list of the compatibility fields that differ (empty when compatible)."""
    return [
        f"{k}: stored {saved.get(k)!r}, now {current.get(k)!r}"
        for k in COMPATIBILITY_FIELDS
        if saved.get(k) != current.get(k)
    ]


def digest(fingerprint: dict[str, Any]) -> str:
    """A short key over the compatibility fields only (so a library upgrade does not count as another model)."""
    core = {k: fingerprint.get(k) for k in COMPATIBILITY_FIELDS}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()
