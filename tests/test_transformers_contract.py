"""The Hugging Face internals mplus_agents relies on, pinned (DESIGN 4; hf/arch.py is the only user).

If a transformers upgrade moves one of these, this file fails loudly with the name of the internal, instead
of the engine silently reading the wrong keys and losing recall. Every supported architecture gets the same
checks on a tiny random model: module layout, the rotary embedding, our RoPE against transformers' own,
DynamicCache construction and in-place writes, decoder-layer outputs, forward pre-hooks with kwargs, and
the forward call the decode loop makes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mplus_agents.errors import UnsupportedModelError
from mplus_agents.hf.arch import Arch, apply_rope
from mplus_agents.hf.hooks import capture_kv, layer_hooks

COMMON: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)
HEAD_DIM = 8


def make(kind: str) -> Any:
    torch.manual_seed(0)
    if kind == "llama":
        model: Any = LlamaForCausalLM(LlamaConfig(**COMMON))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=HEAD_DIM))
    return model.eval()


KINDS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=KINDS)
def model(request: pytest.FixtureRequest) -> Any:
    return make(request.param)


def ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 64, (1, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- layout


def test_module_layout(model: Any) -> None:
    layers = model.model.layers
    assert isinstance(layers, nn.ModuleList) and len(layers) == COMMON["num_hidden_layers"]
    is_qwen3 = model.config.model_type == "qwen3"
    for index in range(len(layers)):
        layer: Any = model.model.layers[index]
        attn = layer.self_attn
        assert isinstance(attn.q_proj, nn.Linear)
        assert attn.q_proj.out_features == COMMON["num_attention_heads"] * HEAD_DIM
        assert attn.k_proj.out_features == attn.v_proj.out_features == COMMON["num_key_value_heads"] * HEAD_DIM
        assert isinstance(layer.input_layernorm, nn.Module)
        # Arch picks q_norm/k_norm when they exist, so other models must not grow a module of that name.
        assert hasattr(attn, "q_norm") == is_qwen3 and hasattr(attn, "k_norm") == is_qwen3
    arch = Arch(model)
    assert arch.shapes.layers == 2 and arch.shapes.heads == 6 and arch.shapes.kv_heads == 2
    assert arch.shapes.head_dim == HEAD_DIM and arch.shapes.groups == 3
    attn = model.model.layers[1].self_attn
    assert arch.key_module(1) is (attn.k_norm if is_qwen3 else attn.k_proj)
    assert arch.query_module(1) is (attn.q_norm if is_qwen3 else attn.q_proj)
    assert arch.value_module(1) is attn.v_proj


def test_rotary_embedding_call(model: Any) -> None:
    positions = torch.arange(5, 12).view(1, -1)
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = model.model.rotary_emb(torch.empty(1, dtype=dtype), positions)
        assert cos.shape == sin.shape == (1, 7, HEAD_DIM)
        assert cos.dtype == sin.dtype == dtype
    cos, sin = model.model.rotary_emb(torch.empty(1), positions)
    assert torch.allclose(cos[0, 0, 0], torch.cos(torch.tensor(5.0)))  # frequency 1 on the first dimension
    a_cos, a_sin = Arch(model).rope(torch.arange(5, 12), torch.float32)
    assert torch.equal(a_cos, cos[0]) and torch.equal(a_sin, sin[0])


def test_apply_rope_equals_transformers(model: Any) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 6, HEAD_DIM, generator=g)
    cos, sin = model.model.rotary_emb(x, torch.arange(3, 12).view(1, -1))
    hf = x.permute(1, 0, 2).unsqueeze(0)  # [1, heads, P, head_dim], transformers' layout
    expected, _ = apply_rotary_pos_emb(hf, hf, cos, sin)
    torch.testing.assert_close(apply_rope(x, cos[0], sin[0]), expected[0].permute(1, 0, 2), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ pre-RoPE K/V and the cache


def captured(model: Any, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    arch = Arch(model)
    with torch.no_grad(), capture_kv(arch) as (keys, values):
        model(input_ids=input_ids)
    assert all(k is not None for k in keys) and all(v is not None for v in values)
    return keys, values  # type: ignore[return-value]


def rotated_cache_data(
    model: Any, keys: list[torch.Tensor], values: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """DynamicCache data [1, kv_heads, P, head_dim] per layer, keys rotated to positions 0..P-1."""
    p = keys[0].shape[0]
    cos, sin = Arch(model).rope(torch.arange(p), torch.float32)
    return [
        (apply_rope(k, cos, sin).permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0))
        for k, v in zip(keys, values, strict=True)
    ]


def test_key_modules_output_pre_rope_keys_that_arch_can_recompute(model: Any) -> None:
    """capture_kv sees the K/V projections (after k_norm on Qwen3); Arch rebuilds them from layer inputs."""
    arch = Arch(model)
    inputs: dict[int, torch.Tensor] = {}

    def pre(layer: int, hidden: torch.Tensor) -> None:
        inputs[layer] = hidden[0].clone()

    seq = ids(10)
    with torch.no_grad(), layer_hooks(arch, pre=pre), capture_kv(arch) as (keys, values):
        model(input_ids=seq)
    for layer in range(2):
        k, v = arch.kv_from_hidden(layer, inputs[layer])
        got_k, got_v = keys[layer], values[layer]
        assert got_k is not None and got_v is not None
        assert got_k.shape == (10, 2, HEAD_DIM)
        torch.testing.assert_close(k, got_k)
        torch.testing.assert_close(v, got_v)
        q = arch.q_from_normed(layer, arch.normed(layer, inputs[layer]))
        assert q.shape == (10, 6, HEAD_DIM)


def test_prefix_cache_from_pre_rope_keys_reproduces_full_context(model: Any) -> None:
    """Rotating captured pre-RoPE keys ourselves and continuing at explicit positions equals one long forward."""
    seq = ids(12)
    with torch.no_grad():
        full = model(input_ids=seq).logits[0, -1]
        keys, values = captured(model, seq[:, :11])
        cache = DynamicCache(ddp_cache_data=rotated_cache_data(model, keys, values))
        out = model(
            input_ids=seq[:, 11:],
            past_key_values=cache,
            position_ids=torch.tensor([[11]]),
            use_cache=True,
            logits_to_keep=1,
        )
    assert out.logits.shape == (1, 1, 64)
    torch.testing.assert_close(out.logits[0, -1], full, rtol=1e-4, atol=1e-4)
    # The cache grew by the token just run, in the same layout.
    cache_layers: Any = cache.layers
    assert cache_layers[0].keys.shape == (1, 2, 12, HEAD_DIM)


def test_dynamic_cache_layout_and_in_place_writes(model: Any) -> None:
    seq = ids(12)
    with torch.no_grad():
        full = model(input_ids=seq).logits[0, -1]
        data = rotated_cache_data(model, *captured(model, seq[:, :11]))
        cache = DynamicCache(ddp_cache_data=[(torch.zeros_like(k), torch.zeros_like(v)) for k, v in data])
        cache_layers: Any = cache.layers
        assert len(cache_layers) == 2
        for layer, (k, v) in enumerate(data):
            keys, vals = cache_layers[layer].keys, cache_layers[layer].values
            assert keys.shape == vals.shape == (1, 2, 11, HEAD_DIM)
            # The engine's per-layer retrieval writes a slice of the prefix in place (engine._read_per_layer).
            keys[0, :, 3:11] = k[0, :, 3:11]
            keys[0, :, :3] = k[0, :, :3]
            vals[0] = v[0]
        out = model(
            input_ids=seq[:, 11:],
            past_key_values=cache,
            position_ids=torch.tensor([[11]]),
            use_cache=True,
            logits_to_keep=1,
        )
    torch.testing.assert_close(out.logits[0, -1], full, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- hooks


def test_decoder_layer_returns_a_tensor(model: Any) -> None:
    outputs: list[Any] = []
    handle = model.model.layers[0].register_forward_hook(lambda _m, _a, out: outputs.append(out))
    try:
        with torch.no_grad():
            model(input_ids=ids(5))
    finally:
        handle.remove()
    assert len(outputs) == 1
    assert isinstance(outputs[0], torch.Tensor), f"decoder layers now return {type(outputs[0]).__name__}"
    assert outputs[0].shape == (1, 5, COMMON["hidden_size"])


def test_forward_pre_hook_with_kwargs_gets_hidden_states_as_first_arg(model: Any) -> None:
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((args, kwargs))

    handle = model.model.layers[1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids(5))
    finally:
        handle.remove()
    ((args, kwargs),) = seen
    assert len(args) >= 1 and isinstance(args[0], torch.Tensor), "hidden states are no longer positional"
    assert args[0].shape == (1, 5, COMMON["hidden_size"])
    assert "hidden_states" not in kwargs


def test_layer_pre_hook_replacement_takes_effect(model: Any) -> None:
    arch = Arch(model)
    seq = ids(6)
    calls: list[int] = []
    with torch.no_grad():
        base = model(input_ids=seq).logits

        def keep(layer: int, hidden: torch.Tensor) -> None:
            calls.append(layer)

        with layer_hooks(arch, pre=keep):
            same = model(input_ids=seq).logits

        def scale(layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
            return hidden * 3.0 if layer == 1 else None

        with layer_hooks(arch, pre=scale):
            changed = model(input_ids=seq).logits
        after = model(input_ids=seq).logits
    assert calls == [0, 1]
    assert torch.equal(same, base)
    assert not torch.allclose(changed, base, atol=1e-3)
    assert torch.equal(after, base), "hooks must be removed when the context exits"


# ---------------------------------------------------------------------------------------------- refused models


def refuses(build: Callable[[], nn.Module], match: str) -> None:
    with pytest.raises(UnsupportedModelError, match=match):
        Arch(build())


def test_gpt2_is_refused() -> None:
    refuses(lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)), "gpt2")


def test_sliding_window_models_are_refused() -> None:
    refuses(lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=32)), "sliding")
    refuses(lambda: MistralForCausalLM(MistralConfig(**COMMON)), "sliding")  # mistral's default is 4096
    refuses(lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=32)), "sliding")
    refuses(
        lambda: Qwen2ForCausalLM(
            Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=32, max_window_layers=0)
        ),
        "sliding",
    )


def test_unsupported_model_error_is_a_value_error() -> None:
    assert issubclass(UnsupportedModelError, ValueError)
