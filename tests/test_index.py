"""Long-term indexes (issue 7, item 1) against the exact torch reference on fresh random data.

A shortlist index must return exactly what `ExactIndex` (= retrieval.token_scores + select_tokens) returns
whenever its shortlist covers the answer, must notice when it does not, and must stay correct while the
functional memory state merges, evicts and forks.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import Any

import pytest
import torch

from mplus_agents import MemoryConfig, MPlusLLM, ops
from mplus_agents.index import (
    AUTO_MIN_TOKENS,
    ExactIndex,
    FaissIndex,
    LayerCandidates,
    ScanIndex,
    ShortlistIndex,
    approximate_shared_select,
    make_index,
)
from mplus_agents.index.base import KeyStats, ScoreContext, certified_select, query_vectors
from mplus_agents.index.scan import scan_available
from mplus_agents.index.shortlist import _CACHE, FaissBackend, import_faiss
from mplus_agents.retrieval import head_mean_logits, select_tokens
from mplus_agents.state import MemoryState, TokenStore
from tests.conftest import CharTokenizer, tiny_llama

faiss = pytest.importorskip("faiss")

SCORERS = ["max_z", "max_logit", "sigmoid_mean"]
HEADS, KV_HEADS, HEAD_DIM = 6, 2, 16


def random_candidates(n: int, extra: int, block_size: int, seed: int, shuffle_blocks: bool = False) -> LayerCandidates:
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(n, KV_HEADS, HEAD_DIM, generator=g)
    small = torch.randn(extra, KV_HEADS, HEAD_DIM, generator=g)
    block = torch.arange(n + extra) // block_size
    if shuffle_blocks:
        block = block[torch.randperm(n + extra, generator=g)]
    age = torch.arange(n + extra - 1, -1, -1)
    return LayerCandidates([big, small], block, age)


def random_q(t: int, seed: int) -> torch.Tensor:
    return torch.randn(t, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(seed)) * 1.5


def shortlist_indexes(cand: LayerCandidates, **kw: Any) -> list[ShortlistIndex]:
    return [ShortlistIndex(cand, "torch", **kw), FaissIndex(cand, "flat", **kw)]


def scan_indexes(cand: LayerCandidates) -> list[ShortlistIndex]:
    """The int8 scan too, where the compiled kernels build (tests/test_scan.py covers it in depth)."""
    return [ScanIndex(cand)] if scan_available(cand) else []


def plant(cand: LayerCandidates, q: torch.Tensor, blocks: int, block_size: int, seed: int) -> None:
    """Give `blocks` random blocks keys that every query head likes, with a different strength per block.

    `sigmoid_mean` averages over every query token and head, so only keys that match all of them stand out
    clearly enough above the k'-th sigmoid of each (token, head) for the bound to prove the selection.
    """
    g = torch.Generator().manual_seed(seed)
    groups = HEADS // KV_HEADS
    liked = q.reshape(q.shape[0], KV_HEADS, groups, HEAD_DIM).sum(dim=(0, 2))
    liked = liked / liked.norm(dim=-1, keepdim=True)
    big = cand.keys[0]
    n_blocks = big.shape[0] // block_size
    for rank, b in enumerate(torch.randperm(n_blocks, generator=g)[:blocks].tolist()):
        rows = slice(b * block_size, (b + 1) * block_size)
        strength = 20.0 + 20.0 * (blocks - rank) / blocks
        big[rows] = liked * strength + 0.3 * torch.randn(block_size, KV_HEADS, HEAD_DIM, generator=g)


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize(("block_size", "exact"), [(1, True), (8, True), (8, False), (5, False)])
def test_shortlist_returns_the_reference_selection(scorer: str, block_size: int, exact: bool) -> None:
    seed = SCORERS.index(scorer) * 10 + block_size
    cand = random_candidates(4000, 150, block_size, seed)
    q = random_q(7, seed + 1)
    kw: dict[str, Any] = {"shortlist_k": 64}
    if scorer == "sigmoid_mean":  # provable only where a few blocks match every query head (see `plant`)
        q = q * 0.1
        plant(cand, q, 96 // block_size + 2, block_size, seed)
        kw = {"shortlist_k": 128, "sigmoid_proof": True}
    want = ExactIndex(cand).select(q, scorer, 96, exact=exact)
    assert want.numel() > 0
    for index in shortlist_indexes(cand, **kw):
        got = index.select(q, scorer, 96, exact=exact)
        assert index.fallbacks == 0, "the shortlist should have covered the answer"
        assert torch.equal(got, want), (index.kind, scorer)


def test_sigmoid_mean_goes_straight_to_the_exact_path() -> None:
    cand = random_candidates(4000, 0, 8, seed=2)
    q = random_q(7, 3)
    index = ShortlistIndex(cand, "torch", shortlist_k=8, max_k=8)
    want = ExactIndex(cand).select(q, "sigmoid_mean", 96, exact=True)
    assert torch.equal(index.select(q, "sigmoid_mean", 96, exact=True), want)
    assert index.fallbacks == 0  # not a failed proof: no shortlist was tried
    tried = ShortlistIndex(cand, "torch", shortlist_k=8, max_k=8, sigmoid_proof=True)
    tried.select(q, "sigmoid_mean", 96, exact=True)
    assert tried.fallbacks == 1


@pytest.mark.parametrize("scorer", SCORERS)
def test_shortlist_with_unsorted_blocks(scorer: str) -> None:
    """Blocks scattered over the store (not the engine's layout) take the bincount / isin path."""
    cand = random_candidates(3000, 40, 6, seed=5, shuffle_blocks=True)
    q = random_q(5, 6)
    for exact in (True, False):
        want = ExactIndex(cand).select(q, scorer, 60, exact=exact)
        for index in shortlist_indexes(cand, shortlist_k=256):
            assert torch.equal(index.select(q, scorer, 60, exact=exact), want)


@pytest.mark.parametrize("scorer", SCORERS)
def test_a_short_shortlist_is_detected_not_trusted(scorer: str) -> None:
    """k'=1 lists too little: taken at face value it picks differently, so the proof must reject it."""
    cand = random_candidates(3000, 0, 4, seed=11)
    q = random_q(6, 12)
    budget = 64
    want = ExactIndex(cand).select(q, scorer, budget, exact=True)
    stats = KeyStats.of(cand.keys[0]) if scorer == "max_z" else None
    ctx = ScoreContext(cand, q, scorer, stats)
    qv = query_vectors(q, KV_HEADS, scorer)
    vals, ids = (qv @ cand.keys[0].reshape(3000, -1).T).topk(1, dim=1)
    listed = torch.unique(ids)
    # Trusting a one-per-query shortlist can give a different answer (or too few blocks to fill the budget)...
    naive = certified_select(ctx, listed, 0.0, budget, exact=True, sorted_blocks=True, trust_order=True)
    assert naive is None or not torch.equal(naive, want)
    # ...so the bound must refuse it.
    assert certified_select(ctx, listed, ctx.bound(vals[:, -1]), budget, exact=True, sorted_blocks=True) is None
    for index in shortlist_indexes(cand, shortlist_k=1, max_k=1, sigmoid_proof=True):
        assert torch.equal(index.select(q, scorer, budget, exact=True), want)
        assert index.fallbacks == 1
    widened = ShortlistIndex(cand, "torch", shortlist_k=1, max_k=4096, sigmoid_proof=True)
    assert torch.equal(widened.select(q, scorer, budget, exact=True), want)


def test_key_statistics_give_the_standardisation_of_max_z() -> None:
    cand = random_candidates(2000, 0, 1, seed=3)
    q = random_q(4, 4)
    stats = KeyStats.of(cand.keys[0][:700]) + KeyStats.of(cand.keys[0][700:])
    mean, std = stats.mean_std(query_vectors(q, KV_HEADS, "max_z"))
    logits = head_mean_logits(q, cand.keys[0])
    torch.testing.assert_close(mean.float(), logits.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std.float(), logits.std(1), rtol=1e-4, atol=1e-5)


def test_ivf_is_approximate_but_mostly_finds_the_reference_blocks() -> None:
    cand = random_candidates(20000, 0, 8, seed=21)
    q = random_q(6, 22)
    index = FaissIndex(cand, "ivf", nprobe=64)
    assert index.approximate
    want = set(ExactIndex(cand).select(q, "max_z", 128, exact=True).tolist())
    got = index.select(q, "max_z", 128, exact=True)
    assert got.numel() == 128
    assert len(want & set(got.tolist())) / len(want) >= 0.5


def test_ivf_retrains_when_the_store_outgrows_its_lists() -> None:
    full = random_candidates(9000, 0, 8, seed=31)
    buffer = full.keys[0]
    small = LayerCandidates([buffer[:1000]], full.block[:1000], full.age[:1000])
    first = FaissIndex(small, "ivf").backend
    assert isinstance(first, FaissBackend) and first.trained_on == 1000
    grown = FaissIndex(LayerCandidates([buffer[:5000]], full.block[:5000], full.age[:5000]), "ivf").backend
    assert grown is first and first.ntotal == 5000  # same buffer, rows added to the trained lists
    big = FaissIndex(full, "ivf").backend
    assert isinstance(big, FaissBackend) and big is not first and big.trained_on == 9000 and big.ntotal == 9000


def test_missing_faiss_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` sees when faiss is not installed
    with pytest.raises(ImportError, match=r"mplus-agents\[faiss\]"):
        import_faiss()
    with pytest.raises(ImportError, match=r"mplus-agents\[faiss\]"):
        FaissIndex(random_candidates(10, 0, 1, seed=0))


def test_config_validates_the_index_kind() -> None:
    assert MemoryConfig().ltm_index == "exact"
    assert MemoryConfig.from_json(MemoryConfig(ltm_index="faiss").to_json()).ltm_index == "faiss"
    with pytest.raises(ValueError, match="ltm_index"):
        MemoryConfig(ltm_index="annoy")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ maintenance


def _token(count: int, layers: int, seed: int) -> TokenStore:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(layers, count, KV_HEADS, HEAD_DIM, generator=g)
    zeros = torch.zeros(layers, count, dtype=torch.int64)
    return TokenStore(k=k, v=torch.randn(layers, count, KV_HEADS, HEAD_DIM, generator=g), age=zeros, block=zeros)


def _layer_candidates(state: MemoryState, layer: int) -> LayerCandidates:
    parts = [p for p in (state.ltm, state.staging) if len(p)]
    block = torch.cat([p.block[layer] for p in parts])
    return LayerCandidates([p.k[layer] for p in parts], block, torch.cat([p.age[layer] for p in parts]))


def _check(state: MemoryState, q: torch.Tensor, budget: int) -> None:
    for layer in range(state.ltm.layers):
        cand = _layer_candidates(state, layer)
        for scorer in SCORERS:
            want = ExactIndex(cand).select(q, scorer, budget, exact=True)
            for index in [*shortlist_indexes(cand, shortlist_k=32), *scan_indexes(cand)]:
                assert torch.equal(index.select(q, scorer, budget, exact=True), want), (index.kind, scorer, layer)


def test_index_follows_merges_evictions_and_forks() -> None:
    cfg = MemoryConfig(
        source="input", pool_size=64, chunk_size=32, min_chunk=1, retrieve_tokens=24, drop_policy="random",
        selection="per_layer", block_size=4, ltm_merge_every=2, ltm_decay=3.0, ltm_initial_rf=10.0,
    )
    layers = 2
    state = MemoryState(
        config=cfg,
        pool=TokenStore.empty(layers, KV_HEADS, HEAD_DIM, dtype=torch.float32),
        ltm=TokenStore.empty(layers, KV_HEADS, HEAD_DIM, dtype=torch.float32, with_rf=True),
        staging=TokenStore.empty(layers, KV_HEADS, HEAD_DIM, dtype=torch.float32),
    )
    q = random_q(5, 99)
    history = []
    sizes = []
    for step in range(14):
        state = ops.add_to_pool(state, _token(32, layers, seed=step))
        history.append(state)
        sizes.append((len(state.ltm), len(state.staging)))
        if len(state.ltm) + len(state.staging) > cfg.retrieve_tokens:
            _check(state, q, cfg.retrieve_tokens)
    # Merges appended (the store grew) and decay evicted (a merge grew it by less than it staged).
    steps = list(itertools.pairwise(sizes))
    assert any(b[0] > a[0] for a, b in steps)
    assert any(a[1] and b[1] == 0 and b[0] < a[0] + a[1] for a, b in steps)
    # A fork: an older state read after newer ones extended the same growth buffer.
    older = next(s for s in reversed(history[:-1]) if len(s.ltm) < len(history[-1].ltm) and len(s.ltm) > 24)
    _check(older, q, cfg.retrieve_tokens)
    # A new state whose store is an in-place-looking copy (same length, new buffer) is not served stale data.
    copy = dataclasses.replace(state, ltm=state.ltm.clone())
    copy.ltm.k[:, :] = torch.randn_like(copy.ltm.k)
    _check(copy, q, cfg.retrieve_tokens)


def test_faiss_backend_grows_incrementally_on_merge() -> None:
    cfg = MemoryConfig(pool_size=64, chunk_size=32, min_chunk=1, retrieve_tokens=8, block_size=4)
    layers = 1
    state = MemoryState(
        config=cfg,
        pool=TokenStore.empty(layers, KV_HEADS, HEAD_DIM, dtype=torch.float32),
        ltm=TokenStore.empty(layers, KV_HEADS, HEAD_DIM, dtype=torch.float32, with_rf=True),
        staging=TokenStore.empty(layers, KV_HEADS, HEAD_DIM, dtype=torch.float32),
    )
    q = random_q(3, 1)
    backends = []
    history = []
    for step in range(8):
        state = ops.add_to_pool(state, _token(32, layers, seed=100 + step))
        if len(state.ltm):
            index = FaissIndex(_layer_candidates(state, 0))
            index.select(q, "max_z", 8, exact=True)
            assert isinstance(index.backend, FaissBackend)
            assert index.backend.ntotal == len(state.ltm)
            backends.append(index.backend)
            history.append(state)
    assert len(backends) >= 3 and all(b is backends[0] for b in backends)  # one index, rows added per merge
    assert any(e.backend is backends[0] for e in _CACHE.values())
    # An older state views a prefix of the same buffer: the index holds more rows than it may see.
    older = history[1]
    assert backends[0].ntotal > len(older.ltm)
    cand = _layer_candidates(older, 0)
    for scorer in SCORERS:
        want = ExactIndex(cand).select(q, scorer, 8, exact=True)
        index = FaissIndex(cand, shortlist_k=4)
        assert index.backend is backends[0]
        assert torch.equal(index.select(q, scorer, 8, exact=True), want)


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("ltm_dtype", [None, "int8"])
@pytest.mark.parametrize("scorer", ["sigmoid_mean", "max_z"])
def test_per_layer_read_with_an_index_gives_the_exact_logits(scorer: str, ltm_dtype: str | None) -> None:
    base = MemoryConfig(
        pool_size=64, chunk_size=32, min_chunk=8, retrieve_tokens=24, block_size=4, selection="per_layer",
        scorer=scorer,  # type: ignore[arg-type]
        ltm_dtype=ltm_dtype,
    )
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), base)
    mem = llm.new_memory()
    for i in range(12):
        mem.inject(f"turn {i}: the {i * 7}th word is {'abcdefghij'[i % 10] * 3} and some more filler")
    assert mem.stats().long_term_tokens > 3 * base.retrieve_tokens
    prompt = torch.tensor(llm.encode("what was the 35th word"))
    results = {}
    for kind in ("exact", "faiss", "torch", "scan"):
        cfg = base.replace(ltm_index=kind)
        state = dataclasses.replace(mem.state, config=cfg)
        with torch.no_grad():
            logits, _, _, info = llm.engine.read(state, llm.sink(cfg), prompt, torch.arange(prompt.numel()))
        results[kind] = (logits, info.retrieved_blocks)
    for kind in ("faiss", "torch", "scan"):
        assert results[kind][1] == results["exact"][1]
        torch.testing.assert_close(results[kind][0], results["exact"][0], rtol=0, atol=0)


def test_make_index_auto_shortlists_only_large_stores() -> None:
    cand = random_candidates(100, 0, 1, seed=0)
    assert isinstance(make_index("auto", cand), ExactIndex)
    large = random_candidates(AUTO_MIN_TOKENS, 10, 4, seed=1)
    index = make_index("auto", large)
    assert isinstance(index, ShortlistIndex) and not index.approximate
    q = random_q(5, 2)
    assert torch.equal(index.select(q, "max_z", 64, exact=True), ExactIndex(large).select(q, "max_z", 64, exact=True))
    with pytest.raises(ValueError, match="unknown"):
        make_index("nope", cand)


# ------------------------------------------------------------------------------------ shared selection


def _shared_reference(cands: dict[int, LayerCandidates], queries: dict[int, torch.Tensor], budget: int) -> torch.Tensor:
    """What `Engine._shared_selection` computes: the sum of each layer's standardised exact scores."""
    first = next(iter(cands.values()))
    total = torch.zeros(len(first))
    for layer, cand in cands.items():
        s = ExactIndex(cand).scores(queries[layer], "max_z")
        total += (s - s.mean()) / (s.std() + 1e-6)
    return select_tokens(total, first.block, first.age, budget, exact=False)


def _shared_inputs(n: int, seed: int) -> tuple[dict[int, LayerCandidates], dict[int, torch.Tensor]]:
    base = random_candidates(n, 0, 8, seed)
    other = random_candidates(n, 0, 8, seed + 1)
    cands = {3: base, 5: LayerCandidates(other.keys, base.block, base.age)}
    return cands, {3: random_q(5, seed + 2), 5: random_q(5, seed + 3)}


def test_approximate_shared_selection_is_exact_when_it_sees_everything() -> None:
    cands, queries = _shared_inputs(600, seed=41)
    indexes = {layer: FaissIndex(c, "ivf", shortlist_k=600, nprobe=64) for layer, c in cands.items()}
    got = approximate_shared_select(indexes, queries, "max_z", 64)
    assert got is not None and torch.equal(got, _shared_reference(cands, queries, 64))


def test_approximate_shared_selection_recall() -> None:
    cands, queries = _shared_inputs(30000, seed=43)
    indexes = {layer: FaissIndex(c, "ivf", shortlist_k=128, nprobe=16) for layer, c in cands.items()}
    got = approximate_shared_select(indexes, queries, "max_z", 128, sample=2048)
    want = _shared_reference(cands, queries, 128)
    assert got is not None and 0 < got.numel() <= 128
    assert len(set(got.tolist()) & set(want.tolist())) / want.numel() >= 0.5


def test_shared_read_with_faiss_ivf_equals_exact_on_a_small_store() -> None:
    base = MemoryConfig(pool_size=64, chunk_size=32, min_chunk=8, retrieve_tokens=16, block_size=4, score_layers=(1, 2))
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), base)
    mem = llm.new_memory()
    for i in range(6):
        mem.inject(f"turn {i}: word {'abcdef'[i] * 4} and filler")
    assert base.retrieve_tokens < len(mem.state.ltm) <= 128  # k'=128 lists every merged token
    prompt = torch.tensor(llm.encode("which word"))
    blocks = {}
    for kind in ("exact", "faiss_ivf"):
        cfg = base.replace(ltm_index=kind)
        state = dataclasses.replace(mem.state, config=cfg)
        with torch.no_grad():
            _, _, _, info = llm.engine.read(state, llm.sink(cfg), prompt, torch.arange(prompt.numel()))
        blocks[kind] = info.retrieved_blocks
    assert blocks["faiss_ivf"] == blocks["exact"] and blocks["exact"][0]
