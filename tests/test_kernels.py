"""Triton kernels (mplus_agents/kernels) against their PyTorch references, on CPU under TRITON_INTERPRET=1.

triton decides whether its functions (its own library ones included) are compiled or interpreted when they
are defined, i.e. when triton is first imported, which `import transformers` already does; the repository's
root conftest.py therefore sets TRITON_INTERPRET=1 on machines without CUDA, before anything is imported.
On a CUDA machine the same tests run the compiled kernels on the GPU. Inputs are
fresh random tensors per case, with shapes that are not multiples of the block sizes, several GQA ratios,
strided views as the engine passes them, and fp32 and bf16. The dispatcher tests need no triton.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from mplus_agents import retrieval
from mplus_agents.kernels import dispatch, reference
from tests.conftest import CharTokenizer, tiny_llama

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install 'mplus-agents[triton]'); kernels untested",
)

KERNEL_MODULES = ("mplus_agents.kernels.scoring", "mplus_agents.kernels.attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]

# bf16 inputs: the kernel widens them exactly and accumulates in fp32, while the references round differently
# (retrieval.py rounds bf16 matmul outputs; max_logit rounds the folded query to bf16), so allow bf16 rounding.
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2}}


@pytest.fixture(scope="module")
def kernels() -> SimpleNamespace:
    """The kernel modules: compiled on CUDA, interpreted on CPU (the root conftest.py sets TRITON_INTERPRET=1)."""
    loaded = {name.rsplit(".", 1)[1]: importlib.import_module(name) for name in KERNEL_MODULES}
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(loaded["scoring"]._score_kernel, InterpretedFunction):
            pytest.fail(
                "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU; "
                "run pytest from the repository root (its conftest.py sets it) or export TRITON_INTERPRET=1"
            )
    return SimpleNamespace(**loaded)


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def layer_view(n: int, kv_heads: int, head_dim: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Keys as a strided view (row stride twice the row size), which the kernel must read in place."""
    return randn(n, 2, kv_heads, head_dim, gen=gen, dtype=dtype, scale=1.5)[:, 1]


# (query tokens T, query heads, kv heads, candidates n, head_dim): GQA 3 (SmolLM2), 1 (MHA), 4 and 6 (one KV head);
# n below, at and beyond the 64-candidate tile; head_dim 24 and 40 are not powers of two; 33 * 6 rows span steps.
SCORE_SHAPES = [
    (5, 9, 3, 100, 64),
    (1, 4, 4, 1, 16),
    (7, 8, 2, 130, 24),
    (33, 6, 1, 65, 40),
    (2, 12, 3, 64, 128),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scorer", ["sigmoid_mean", "max_logit"])
@pytest.mark.parametrize("shape", SCORE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_token_scores_match_reference(
    kernels: SimpleNamespace, shape: tuple[int, ...], scorer: str, dtype: torch.dtype
) -> None:
    t, heads, kv_heads, n, head_dim = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, scorer, dtype)).encode()))
    q = randn(t, heads, head_dim, gen=gen, scale=1.5)
    k = layer_view(n, kv_heads, head_dim, gen, dtype)
    assert not k.is_contiguous() or n == 1
    got = kernels.scoring.token_scores(q, k, scorer)
    ref_fn = reference.sigmoid_mean_scores if scorer == "sigmoid_mean" else reference.max_logit_scores
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got, ref_fn(q.to(dtype), k), **TOL[dtype])
    torch.testing.assert_close(got, retrieval.token_scores(q, k, scorer), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("t", "heads", "kv_heads", "head_dim", "sizes"),
    [(5, 9, 3, 64, (100, 1, 70)), (1, 4, 4, 16, (2,)), (33, 6, 2, 40, (64, 0, 129)), (4, 8, 1, 32, (1,))],
    ids=["smol-3parts", "two-candidates", "rows-beyond-a-step", "one-candidate"],
)
def test_max_z_over_parts_matches_reference(
    kernels: SimpleNamespace,
    t: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    sizes: tuple[int, ...],
    dtype: torch.dtype,
) -> None:
    """Standardised over all parts' candidates at once (an empty part included); the keys share an offset, as
    real keys do, so the logits' mean is far from zero."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((t, sizes, dtype)).encode()))
    q = randn(t, heads, head_dim, gen=gen, scale=1.5)
    offset = randn(1, kv_heads, head_dim, gen=gen, scale=3.0)
    parts = [(layer_view(n, kv_heads, head_dim, gen, torch.float32) + offset).to(dtype) for n in sizes]
    got = kernels.scoring.max_z_scores(q, parts)
    assert got.shape == (sum(sizes),)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
    torch.testing.assert_close(got, reference.max_z_scores(q.to(dtype), parts), **tol)
    torch.testing.assert_close(got, retrieval.max_z_scores(q, parts), **tol)
    if len(parts) == 1:
        torch.testing.assert_close(kernels.scoring.token_scores(q, parts[0], "max_z"), got)


@needs_triton
@pytest.mark.parametrize("scorer", ["sigmoid_mean", "max_logit", "max_z"])
def test_score_top_k_returns_the_reference_best(kernels: SimpleNamespace, scorer: str) -> None:
    gen = torch.Generator().manual_seed(11)
    q = randn(6, 9, 64, gen=gen)
    k = layer_view(300, 3, 64, gen, torch.float32)
    ref = {
        "sigmoid_mean": reference.sigmoid_mean_scores,
        "max_logit": reference.max_logit_scores,
        "max_z": lambda q, k: reference.max_z_scores(q, [k]),
    }[scorer](q, k)
    values, index = kernels.scoring.score_top_k(q, k, scorer, 20)
    ref_values, _ = reference.top_k(ref, 20)
    torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)
    # Equal up to near-ties: every returned candidate scores at least the reference's 20th best.
    assert index.unique().numel() == 20
    assert bool((ref[index] >= ref_values[-1] - 1e-5).all())
    assert kernels.scoring.score_top_k(q, k[:7], scorer, 20)[1].numel() == 7


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(6, 200, 77), (1, 16, 1), (12, 64, 300), (40, 48, 5)], ids=str)
def test_projector_scores_match_reference(
    kernels: SimpleNamespace, shape: tuple[int, int, int], dtype: torch.dtype
) -> None:
    t, dim, n = shape
    gen = torch.Generator().manual_seed(t * 1000 + dim + n)
    q = randn(t, dim, gen=gen, scale=dim**-0.5 * 2)
    keys = randn(n, dim, gen=gen, dtype=dtype)
    got = kernels.scoring.projector_scores(q, keys)
    torch.testing.assert_close(got, reference.projector_sigmoid_mean(q.to(dtype), keys), **TOL[dtype])
    torch.testing.assert_close(got, retrieval.projector_scores(q, keys), **TOL[dtype])


@needs_triton
def test_scoring_edge_cases(kernels: SimpleNamespace) -> None:
    gen = torch.Generator().manual_seed(3)
    q = randn(4, 6, 16, gen=gen)
    assert kernels.scoring.token_scores(q, torch.zeros(0, 2, 16), "sigmoid_mean").shape == (0,)
    assert kernels.scoring.token_scores(q[:0], randn(5, 2, 16, gen=gen), "max_logit").tolist() == [0.0] * 5
    assert kernels.scoring.projector_scores(randn(3, 8, gen=gen), torch.zeros(0, 8)).shape == (0,)
    with pytest.raises(ValueError, match="max_q"):
        kernels.scoring.token_scores(q, randn(5, 2, 16, gen=gen), "max_q")


# (batch, heads, kv heads, prompt T, prefix P, head_dim): T below and beyond the 32-query block, no prefix,
# one-token decode, GQA 1-4, head_dim 24 (not a power of two) and 128.
ATTENTION_SHAPES = [
    (1, 9, 3, 5, 40, 64),
    (2, 4, 4, 33, 0, 16),
    (1, 8, 2, 7, 70, 24),
    (1, 2, 1, 1, 100, 32),
    (2, 4, 1, 37, 29, 128),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prefix_causal_attention_matches_reference(
    kernels: SimpleNamespace, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    batch, heads, kv_heads, t, prefix, head_dim = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    # Laid out as HF passes them: [B, T, heads, hd] projections viewed as [B, heads, T, hd].
    q = randn(batch, t, heads, head_dim, gen=gen, dtype=dtype, scale=2.0).transpose(1, 2)
    k = randn(batch, prefix + t, kv_heads, head_dim, gen=gen, dtype=dtype, scale=2.0).transpose(1, 2)
    v = randn(batch, prefix + t, kv_heads, head_dim, gen=gen, dtype=dtype).transpose(1, 2)
    got = kernels.attention.prefix_causal_attention(q, k, v)
    assert got.dtype == dtype and got.shape == (batch, heads, t, head_dim)
    expected = reference.prefix_causal_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(got.float(), expected, **TOL[dtype])
    torch.testing.assert_close(got.float(), dispatch.prefix_causal_attention(q, k, v).float(), **TOL[dtype])
    scaled = kernels.attention.prefix_causal_attention(q, k, v, scale=0.05)
    torch.testing.assert_close(
        scaled.float(), reference.prefix_causal_attention(q.float(), k.float(), v.float(), scale=0.05), **TOL[dtype]
    )


@needs_triton
def test_attention_rejects_impossible_shapes(kernels: SimpleNamespace) -> None:
    gen = torch.Generator().manual_seed(5)
    with pytest.raises(ValueError, match="causal block"):
        kernels.attention.prefix_causal_attention(randn(1, 2, 5, 16, gen=gen), *[randn(1, 1, 3, 16, gen=gen)] * 2)
    with pytest.raises(ValueError, match="KV heads"):
        kernels.attention.prefix_causal_attention(randn(1, 3, 2, 16, gen=gen), *[randn(1, 2, 4, 16, gen=gen)] * 2)


@needs_triton
def test_registered_hf_attention_reproduces_sdpa_over_a_cached_prefix(kernels: SimpleNamespace) -> None:
    """The registered function inside a real (tiny) Llama: prompt over a cached prefix, then one decode step."""
    from mplus_agents.kernels import ATTENTION_NAME, register_hf_attention

    assert register_hf_attention() == ATTENTION_NAME
    model = tiny_llama().to(DEVICE)
    ids = torch.randint(3, 64, (1, 30), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    with torch.no_grad():
        prefix = model(ids[:, :18], use_cache=True).past_key_values  # a memory prefix of P=18 tokens

        def run(impl: str) -> tuple[torch.Tensor, torch.Tensor]:
            model.set_attn_implementation(impl)
            cache: DynamicCache = copy.deepcopy(prefix)
            prompt = model(ids[:, 18:29], past_key_values=cache, use_cache=True)
            step = model(ids[:, 29:], past_key_values=prompt.past_key_values, use_cache=True)
            return prompt.logits, step.logits

        sdpa = run("sdpa")
        kernel = run(ATTENTION_NAME)
        assert model.config._attn_implementation == ATTENTION_NAME
        for got, expected in zip(kernel, sdpa, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(NotImplementedError, match="padding"):
            model(ids[:, :4], attention_mask=torch.tensor([[0, 1, 1, 1]], device=DEVICE))
        model.set_attn_implementation("sdpa")


@needs_triton
def test_engine_read_with_the_registered_attention_matches_sdpa(kernels: SimpleNamespace) -> None:
    """The memory read end to end (long-term retrieval, prefix assembly, prompt over the prefix) on a tiny Llama:
    the registered kernel gives sdpa's logits, and a greedy reply is the same."""
    from mplus_agents import MemoryConfig, MPlusLLM
    from mplus_agents.kernels import register_hf_attention

    name = register_hf_attention()
    cfg = MemoryConfig(pool_size=40, chunk_size=32, min_chunk=8, retrieve_tokens=16, block_size=4)
    llm = MPlusLLM(tiny_llama().to(DEVICE), CharTokenizer(), cfg)
    mem = llm.new_memory()
    for i in range(5):
        mem.inject(f"turn number {i} with some words about item {i * 7}")
    assert mem.stats().long_term_tokens > 0
    prompt = torch.tensor([3 + (b % 60) for b in b"which item was in turn 3?"], device=DEVICE)
    outputs = {}
    for impl in ("sdpa", name):
        llm.model.set_attn_implementation(impl)
        with torch.no_grad():
            logits, _, _, read = llm.engine.read(mem.state, llm.sink(mem.config), prompt, torch.arange(len(prompt)))
        outputs[impl] = (logits, read.retrieved_tokens, llm.chat("which item was in turn 3?", memory=mem,
                                                                 max_new_tokens=6, temperature=0.0))
    llm.model.set_attn_implementation("sdpa")
    assert outputs[name][1] == outputs["sdpa"][1] > 0
    torch.testing.assert_close(outputs[name][0], outputs["sdpa"][0], atol=1e-5, rtol=1e-5)
    assert outputs[name][2] == outputs["sdpa"][2]


@needs_triton
def test_kernels_compile_for_nvidia_gpus_without_one(tmp_path: Path) -> None:
    """The interpreter accepts code the compiler rejects, so compile every kernel for sm_86 and sm_90 as well
    (triton ships ptxas), in a process where TRITON_INTERPRET is unset, and check the shared memory they need."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels_compile"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode == 77:
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("ok   sm_") == 20


def test_dispatch_picks_torch_on_cpu_without_warning() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k = randn(3, 6, 16, gen=gen), randn(20, 2, 16, gen=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.choose_backend(q, k) == "torch"
        assert dispatch.token_scores(q, k, "sigmoid_mean") is None
        assert dispatch.max_z_scores(q, [k, k]) is None
        assert dispatch.projector_scores(randn(3, 8, gen=gen), randn(4, 8, gen=gen)) is None
        # retrieval.py's public functions keep their torch path on CPU.
        torch.testing.assert_close(retrieval.token_scores(q, k, "sigmoid_mean"), reference.sigmoid_mean_scores(q, k))
        torch.testing.assert_close(retrieval.max_z_scores(q, [k[:5], k[5:]]), reference.max_z_scores(q, [k]))


def test_dispatch_torch_attention_matches_reference_on_cpu() -> None:
    gen = torch.Generator().manual_seed(2)
    q = randn(2, 6, 9, 16, gen=gen)
    k, v = randn(2, 3, 21, 16, gen=gen), randn(2, 3, 21, 16, gen=gen)
    torch.testing.assert_close(dispatch.prefix_causal_attention(q, k, v), reference.prefix_causal_attention(q, k, v))


def test_cuda_without_triton_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one fallback a user should hear about: CUDA tensors, no triton. Only the decision is exercised here."""
    monkeypatch.setattr(dispatch, "_warned", False)
    with pytest.warns(RuntimeWarning, match=r"mplus-agents\[triton\]"):
        assert dispatch.backend_for(on_cuda=True, installed=False) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.backend_for(on_cuda=True, installed=False) == "torch"
        assert dispatch.backend_for(on_cuda=True, installed=True) == "triton"
        assert dispatch.backend_for(on_cuda=False, installed=True) == "torch"
    monkeypatch.setenv("MPLUS_KERNELS", "torch")
    assert dispatch.backend_for(on_cuda=True, installed=True) == "torch"
