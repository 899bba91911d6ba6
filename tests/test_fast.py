"""The fast path (`mplus_agents.fast`) against the stock Hugging Face forward, on fresh random inputs.

Decode steps and injected keys/values must match within fp32 tolerance on tiny random Llama, Qwen2 (q/k/v
biases) and Qwen3 (q/k norms) models, packed and unpacked, and on the embedded SmolLM2; greedy replies must
be token-identical; stale packed weights must be rebuilt; unsupported modules must fall back.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from mplus_agents import MemoryConfig, MPlusLLM
from mplus_agents.engine import Engine
from mplus_agents.fast import FastDecoder, StaticCache
from mplus_agents.generation import SamplingConfig
from mplus_agents.hf.hooks import capture_kv
from mplus_agents.kernels import native
from tests.conftest import CharTokenizer, tiny_llama, tiny_qwen3


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
        use_sliding_window=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random init leaves biases at zero; make them matter
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


MAKERS = [tiny_llama, tiny_qwen2, tiny_qwen3]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def hf_decode(engine: Engine, prompt: torch.Tensor, steps: list[int]) -> list[torch.Tensor]:
    """Logits after the prompt and after each forced token, through the stock forward."""
    cache = DynamicCache()
    with torch.no_grad():
        out = [engine.forward(cache, prompt, 0)[-1]]
        for i, tok in enumerate(steps):
            out.append(engine.forward(cache, torch.tensor([tok]), len(prompt) + i)[-1])
    return out


VARIANTS = {
    "compiled": dict(native=True),
    "torch-packed": dict(native=False, pack=True),
    "torch-plain": dict(native=False, pack=False),
}
"""The compiled C step (kernels/cpu_decode.c, the CPU default) and both torch layouts."""


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("make", MAKERS)
def test_decode_steps_match_stock_forward(make, variant: str) -> None:
    if variant == "compiled" and native.compiler() is None:
        pytest.skip("no C compiler")
    engine = Engine(make(seed=3))
    fast = FastDecoder(engine.arch, **VARIANTS[variant])  # type: ignore[arg-type]
    assert (fast.native is not None) == (variant == "compiled")
    gen = torch.Generator().manual_seed(11)
    prompt = torch.randint(3, 64, (37,), generator=gen)
    steps = torch.randint(3, 64, (12,), generator=gen).tolist()
    ref = hf_decode(engine, prompt, steps)
    cache = DynamicCache()
    with torch.no_grad():
        engine.forward(cache, prompt, 0)
    static = StaticCache.from_dynamic(fast, cache, len(steps))
    for i, tok in enumerate(steps):
        got = fast.step(static, tok, len(prompt) + i)
        assert rel_err(got, ref[i + 1]) < 1e-5, i
    assert static.length == static.capacity
    with pytest.raises(ValueError, match="full"):
        fast.step(static, 5, len(prompt) + len(steps))


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("make", MAKERS)
def test_prefill_kv_matches_captured_kv(make, pack: bool) -> None:
    engine = Engine(make(seed=5))
    fast = FastDecoder(engine.arch, pack=pack)
    s = engine.arch.shapes
    gen = torch.Generator().manual_seed(7)
    prefix_k = torch.randn(s.layers, 9, s.kv_heads, s.head_dim, generator=gen)
    prefix_v = torch.randn(s.layers, 9, s.kv_heads, s.head_dim, generator=gen)
    ids = torch.randint(3, 64, (41,), generator=gen)
    with torch.no_grad(), capture_kv(engine.arch) as (keys, values):
        engine.forward(engine._rope_cache(prefix_k, prefix_v), ids, 9)
    k, v = fast.prefill_kv(ids, prefix_k, prefix_v)
    assert k.shape == (s.layers, 41, s.kv_heads, s.head_dim)
    assert rel_err(k, torch.stack(keys)) < 1e-5  # type: ignore[arg-type]
    assert rel_err(v, torch.stack(values)) < 1e-5  # type: ignore[arg-type]


@pytest.mark.parametrize("make", MAKERS)
def test_generation_and_injection_unchanged_by_fast_path(make) -> None:
    cfg = MemoryConfig(pool_size=96, chunk_size=40, min_chunk=17, retrieve_tokens=24, block_size=4)
    replies, states = [], []
    for use_fast in (True, False):
        llm = MPlusLLM(make(seed=1), CharTokenizer(), cfg)
        llm.engine.use_fast = use_fast
        mem = llm.new_memory()
        for turn in ["the locker code is 4812 and the city is lisbon", "unrelated filler text " * 12]:
            mem.inject(turn)
        assert (llm.engine.fast() is not None) == use_fast
        gen = llm.start(llm.raw_prompt("what is the code"), mem, SamplingConfig(max_new_tokens=20))
        "".join(gen.pieces)
        replies.append(gen.result.token_ids)
        states.append(mem.state)
    assert replies[0] == replies[1]
    assert rel_err(states[0].pool.k, states[1].pool.k) < 1e-5
    assert rel_err(states[0].ltm.v, states[1].ltm.v) < 1e-5


def test_changed_weights_rebuild_the_packed_copy() -> None:
    engine = Engine(tiny_llama(seed=2))
    first = engine.fast()
    assert first is not None and first.current()
    assert engine.fast() is first
    with torch.no_grad():
        engine.model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    assert not first.current()
    second = engine.fast()
    assert second is not None and second is not first
    prompt = torch.randint(3, 64, (20,), generator=torch.Generator().manual_seed(0))
    ref = hf_decode(engine, prompt[:-1], [int(prompt[-1])])[-1]
    cache = DynamicCache()
    with torch.no_grad():
        engine.forward(cache, prompt[:-1], 0)
    got = second.step(StaticCache.from_dynamic(second, cache, 1), int(prompt[-1]), len(prompt) - 1)
    assert rel_err(got, ref) < 1e-5


class Scaled(nn.Module):
    """A stand-in adapter: not an nn.Linear, so the fast path must not bypass it."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 0.5


def test_unknown_modules_fall_back_to_stock_path() -> None:
    model = tiny_llama(seed=4)
    attn = model.model.layers[0].self_attn
    attn.v_proj = Scaled(attn.v_proj)  # type: ignore[assignment]
    engine = Engine(model)
    assert not FastDecoder.supports(engine.arch)
    assert engine.fast() is None
    with pytest.raises(ValueError, match="not supported"):
        FastDecoder(engine.arch)


@pytest.mark.slow
def test_smol_fast_path_matches_stock(smol: MPlusLLM) -> None:
    engine = smol.engine
    fast = engine.fast()
    assert fast is not None and (fast.native is not None or native.compiler() is None)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 49152, (60,), generator=gen)
    steps = torch.randint(0, 49152, (6,), generator=gen).tolist()
    ref = hf_decode(engine, prompt, steps)
    cache = DynamicCache()
    with torch.no_grad():
        engine.forward(cache, prompt, 0)
    static = StaticCache.from_dynamic(fast, cache, len(steps))
    for i, tok in enumerate(steps):
        assert rel_err(fast.step(static, tok, len(prompt) + i), ref[i + 1]) < 1e-5

    cfg = dataclasses.replace(smol.config, chunk_size=64)
    text = "I moved to Lisbon in May. My locker code is 4812. " * 6
    replies, pools = [], []
    try:
        for use_fast in (True, False):
            engine.use_fast = use_fast
            mem = smol.new_memory(cfg)
            mem.inject(text, role="user")
            replies.append(smol.chat("What is my locker code?", memory=mem, max_new_tokens=16))
            pools.append(mem.state.pool.k)
    finally:
        engine.use_fast = True
    assert replies[0] == replies[1]
    assert rel_err(pools[0], pools[1]) < 1e-5


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3])
def test_bf16_model_runs_in_its_dtype(make) -> None:
    """bf16 weights: same math in bf16; agreement is bf16-close (rounding order differs), not fp32-exact."""
    engine = Engine(make(seed=6).to(torch.bfloat16))
    fast = engine.fast()
    assert fast is not None and fast.dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 64, (30,), generator=gen)
    steps = torch.randint(3, 64, (5,), generator=gen).tolist()
    ref = hf_decode(engine, prompt, steps)
    cache = DynamicCache()
    with torch.no_grad():
        engine.forward(cache, prompt, 0)
    static = StaticCache.from_dynamic(fast, cache, len(steps))
    for i, tok in enumerate(steps):
        got = fast.step(static, tok, len(prompt) + i)
        assert got.dtype == torch.bfloat16
        assert rel_err(got.float(), ref[i + 1].float()) < 3e-2


def test_hooked_modules_fall_back_to_stock_path() -> None:
    """A forward hook (how LoRA adapters attach) changes a module's output; the fast path must not skip it."""
    llm = MPlusLLM(tiny_llama(seed=8), CharTokenizer())
    assert llm.engine.fast() is not None
    proj = llm.model.model.layers[2].mlp.up_proj
    handle = proj.register_forward_hook(lambda _m, _a, out: out * 2)
    try:
        assert llm.engine.fast() is None
        hooked = llm.chat("abc", max_new_tokens=12)
    finally:
        handle.remove()
    assert llm.engine.fast() is not None
    plain = llm.chat("abc", max_new_tokens=12)
    assert hooked != plain  # the hook mattered, and the hooked reply came from the stock path
