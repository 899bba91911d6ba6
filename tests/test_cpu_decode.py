"""The compiled CPU decode step (`mplus_agents/kernels/cpu_decode.c`) against torch, on fresh random inputs.

Each piece (panel product, RMSNorm, grouped-query attention) is compared with the torch computation it
replaces, on shapes that are and are not multiples of the kernel's panel sizes; whole steps are compared
with FastDecoder's torch step and the stock forward in tests/test_fast.py. Also: the build is cached, a
failing compiler falls back to torch with a warning, and MPLUS_NATIVE=0 switches the kernel off.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mplus_agents import MPlusLLM
from mplus_agents.engine import Engine
from mplus_agents.fast import FastDecoder, StaticCache
from mplus_agents.kernels import cpu_decode, native
from tests.conftest import CharTokenizer, tiny_llama

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def lib():
    loaded = native.load()
    assert loaded is not None, "a C compiler is installed, so the kernel must build"
    return loaded


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (37, 29), (8, 16), (1, 1), (13, 100)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_gemv_matches_linear(lib, n: int, k: int, with_bias: bool, weights: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + k)
    w, x = torch.randn(n, k, generator=gen), torch.randn(k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    got = cpu_decode.gemv(lib, w, x, bias, weights)
    assert got.shape == (n,)
    # bf16 panels: the fp32 product with the weights rounded to bf16 (widening to fp32 is exact).
    assert rel_err(got, F.linear(x, w.to(weights).float(), bias)) < 1e-6
    if weights == torch.bfloat16:
        assert rel_err(got, F.linear(x, w, bias)) > 1e-4  # the rounding is real: the check above can fail


def test_pack_panel_layout() -> None:
    w = torch.arange(20 * 20, dtype=torch.float32).view(20, 20)
    p = cpu_decode.pack_panel(w)
    assert p.shape == (3, 2, 8, 16)  # rows padded to 24, columns to 32
    assert p[1, 1, 2, 3] == w[8 + 2, 16 + 3]
    assert p[2, 0, 4, 0] == 0 and p[0, 1, 0, 4] == 0  # padding rows and columns are zero


def test_arena_packs_aligned_panels() -> None:
    shapes = [(37, 29), (960, 576), (8, 16)]
    arena = cpu_decode.PanelArena(sum(cpu_decode.panel_numel(n, k) * 4 + 64 for n, k in shapes))
    gen = torch.Generator().manual_seed(3)
    for n, k in shapes:
        w = torch.randn(n, k, generator=gen)
        got = arena.pack(w, torch.float32)
        assert got.data_ptr() % 64 == 0
        assert torch.equal(got, cpu_decode.pack_panel(w).reshape(-1))
    with pytest.raises(ValueError, match="full"):  # a panel past the mapping's end is refused, never written
        arena.pack(torch.randn(64, 64), torch.float32)


@pytest.mark.parametrize("n", [576, 48, 7])
def test_rms_matches_torch(lib, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x, w = torch.randn(n, generator=gen) * 3, torch.randn(n, generator=gen)
    ref = w * (x * torch.rsqrt(x.pow(2).mean() + 1e-5))
    assert rel_err(cpu_decode.rms(lib, x, w, 1e-5), ref) < 1e-6


def test_vector_exp_matches_torch(lib) -> None:
    """Within 2 ulp of torch.exp where expf is normal, 0 where it is subnormal, inf where it overflows."""
    gen = torch.Generator().manual_seed(7)
    x = torch.cat([torch.rand(20_000, generator=gen) * 174 - 87, torch.randn(4_000, generator=gen), torch.zeros(3)])
    got, ref = cpu_decode.exp(lib, x), torch.exp(x)
    assert ((got - ref).abs() <= 2 * torch.finfo(torch.float32).eps * ref).all()
    edges = torch.tensor([-1e30, -200.0, -87.5, 88.9, 1e30, float("-inf"), float("inf")] + [0.0] * 9)
    assert cpu_decode.exp(lib, edges)[:7].tolist() == [0.0, 0.0, 0.0, float("inf"), float("inf"), 0.0, float("inf")]


@pytest.mark.parametrize(
    "heads,kv,hd,cap,length",
    # groups of 3, 1, 8, 5 and 2 query heads (a pass over K/V serves 4, the last one repeated as padding); head
    # sizes with ragged or extra slices
    [(9, 3, 64, 500, 440), (6, 2, 8, 40, 1), (4, 4, 16, 33, 33), (8, 1, 24, 70, 65), (10, 2, 80, 300, 257),
     (4, 2, 128, 200, 129), (8, 4, 32, 90, 77)],
)
def test_attend_matches_sdpa(lib, heads: int, kv: int, hd: int, cap: int, length: int) -> None:
    gen = torch.Generator().manual_seed(heads * cap + length)
    q = torch.randn(heads, hd, generator=gen)
    k, v = torch.randn(kv, cap, hd, generator=gen) * 2, torch.randn(kv, cap, hd, generator=gen)
    got = cpu_decode.attend(lib, q, k, v, length)
    assert rel_err(got, cpu_decode.reference_attend(q, k, v, length)) < 1e-5


def test_odd_sized_model_steps_match_torch_step(lib) -> None:
    """Hidden, head, MLP and vocabulary sizes that are not multiples of the panel sizes (padding paths)."""
    model = tiny_llama(
        seed=9, hidden_size=40, num_attention_heads=5, num_key_value_heads=1, intermediate_size=72, vocab_size=61
    )
    arch = Engine(model).arch
    nat, ref = FastDecoder(arch, native=True), FastDecoder(arch, native=False)
    assert nat.native is not None and ref.native is None
    caches = [StaticCache.empty(f, 40) for f in (nat, ref)]
    gen = torch.Generator().manual_seed(1)
    prefix_k, prefix_v = torch.randn(caches[0].k.shape, generator=gen), torch.randn(caches[0].v.shape, generator=gen)
    for c in caches:
        c.k.copy_(prefix_k)
        c.v.copy_(prefix_v)
        c.length = 17
    for i, tok in enumerate(torch.randint(0, 61, (10,), generator=gen).tolist()):
        got, want = nat.step(caches[0], tok, 17 + i), ref.step(caches[1], tok, 17 + i)
        assert got.shape == want.shape == (61,)
        assert rel_err(got, want) < 1e-5
    assert rel_err(caches[0].k, caches[1].k) < 1e-6 and rel_err(caches[0].v, caches[1].v) < 1e-6


def test_bf16_weights_step_is_the_fp32_step_on_rounded_weights(lib) -> None:
    """decode_weights='bfloat16': every matrix rounded to bf16, everything else (embeddings, norms) fp32."""
    model = tiny_llama(seed=4, tie_word_embeddings=True)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        rounded.lm_head.weight = nn.Parameter(model.lm_head.weight.to(torch.bfloat16).float())  # unties it
        for m in rounded.model.layers.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(m.weight.to(torch.bfloat16).float())
    nat = FastDecoder(Engine(model).arch, weights=torch.bfloat16)
    ref = FastDecoder(Engine(rounded).arch, native=False)
    assert nat.native is not None and nat.native.weights == torch.bfloat16
    caches = [StaticCache.empty(f, 24) for f in (nat, ref)]
    for i, tok in enumerate([5, 9, 33, 2, 60, 17]):
        assert rel_err(nat.step(caches[0], tok, i), ref.step(caches[1], tok, i)) < 1e-5


def test_engine_decode_weights_setting(lib) -> None:
    llm = MPlusLLM(tiny_llama(seed=2), CharTokenizer())
    fp32_reply = llm.chat("abc", max_new_tokens=8)
    llm.engine.decode_weights = "bfloat16"
    fast = llm.engine.fast()
    assert fast is not None and fast.native is not None and fast.native.weights == torch.bfloat16
    assert isinstance(llm.chat("abc", max_new_tokens=8), str)
    llm.engine.decode_weights = None
    assert llm.engine.fast().native.weights == torch.float32  # type: ignore[union-attr]
    assert llm.chat("abc", max_new_tokens=8) == fp32_reply
    llm.engine.decode_weights = "int4"
    with pytest.raises(ValueError, match="bfloat16"):
        llm.engine.fast()
    bf16 = MPlusLLM(tiny_llama(seed=2).to(torch.bfloat16), CharTokenizer())
    bf16.engine.decode_weights = "bfloat16"
    with pytest.warns(UserWarning, match="ignored"):
        assert bf16.engine.fast() is not None
    assert bf16.engine.decode_weights is None


def test_build_is_cached_by_source_compiler_and_cpu(tmp_path, monkeypatch) -> None:
    cc = native.compiler()
    assert cc is not None
    monkeypatch.setenv("MPLUS_CACHE_DIR", str(tmp_path))
    path = native.library_path(cc)
    assert path.parent == tmp_path / "native" and not path.exists()
    native.build(cc, path)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    assert native.library_path(cc) == path
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-DMP_EXTRA=1"))
    assert native.library_path(cc) != path


def fresh_loader(monkeypatch) -> None:
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)


def test_failing_compiler_falls_back_to_torch_with_a_warning(tmp_path, monkeypatch) -> None:
    fresh_loader(monkeypatch)
    monkeypatch.setenv("MPLUS_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "cc"
    broken.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && echo broken-cc 1.0 && exit 0\necho 'no such flag' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.warns(RuntimeWarning, match="no such flag"):
        assert native.load() is None
    fast = FastDecoder(Engine(tiny_llama(seed=1)).arch)
    assert fast.native is None and fast.pack  # the torch path, with its packed weights
    with pytest.raises(RuntimeError, match="not available"):
        FastDecoder(Engine(tiny_llama(seed=1)).arch, native=True)


def test_switched_off_by_environment(monkeypatch) -> None:
    fresh_loader(monkeypatch)
    monkeypatch.setenv("MPLUS_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load() is None
    assert FastDecoder(Engine(tiny_llama(seed=1)).arch).native is None


def test_huge_page_zeros_is_zeroed_writable_and_kept_alive() -> None:
    """The CPU StaticCache's storage: its own (huge-page) mapping, which the tensor keeps alive."""
    k = cpu_decode.huge_page_zeros((3, 2, 5, 4), torch.float32)
    gc.collect()
    assert k.shape == (3, 2, 5, 4) and k.dtype == torch.float32 and k.is_contiguous()
    assert torch.count_nonzero(k) == 0
    k[1, 1, 4] = torch.arange(4.0)
    assert k.sum().item() == 6.0
    assert cpu_decode.huge_page_zeros((2, 8), torch.bfloat16).dtype == torch.bfloat16
    assert cpu_decode.huge_page_zeros((3, 0, 4), torch.float32).shape == (3, 0, 4)

