"""The int8 bound scan (`kernels/ltm_scan.c`, `index/scan.py`) against plain torch on fresh random inputs.

Kernel pieces against their torch references (packing byte for byte, VNNI and portable bounds against the same
arithmetic in torch, the listing), the bounds against the exact scores (for float32, bfloat16 and int8 stores),
and the index's selections against `ExactIndex`'s, including growing and forked stores and a real model read.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from mplus_agents import quant
from mplus_agents.index import ExactIndex, LayerCandidates, ScanIndex, make_index
from mplus_agents.index import scan as scan_module
from mplus_agents.index.base import KeyStats, ScoreContext, query_vectors
from mplus_agents.index.scan import ScanContext
from mplus_agents.kernels import ltm_scan, native

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine")

HEADS, KV_HEADS, HEAD_DIM = 6, 2, 16
SCAN_SCORERS = ["max_z", "max_logit"]


@pytest.fixture(scope="module")
def lib() -> Any:
    loaded = native.load()
    assert loaded is not None, "a compiler is on PATH, so the kernels must build"
    return loaded


def anisotropic(n: int, dim: int, seed: int) -> torch.Tensor:
    """Keys with one loud channel and uneven spreads, like a real layer's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g) * torch.linspace(0.2, 2.0, dim)
    x[:, dim // 3] += 6.0
    return x


def stored(keys: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """keys [n, KV, HD] as a store of `kind` holds them: (keys, int8 scales or None)."""
    if kind == "int8":
        return quant.quantize(keys)
    return keys.to(getattr(torch, kind)), None


def random_candidates(
    n: int, extra: int, block_size: int, seed: int, kind: str = "float32", shuffle: bool = False
) -> LayerCandidates:
    g = torch.Generator().manual_seed(seed)
    big, big_scale = stored(anisotropic(n, KV_HEADS * HEAD_DIM, seed).reshape(n, KV_HEADS, HEAD_DIM), kind)
    small, small_scale = stored(torch.randn(extra, KV_HEADS, HEAD_DIM, generator=g), kind)
    block = torch.arange(n + extra) // block_size
    if shuffle:
        block = block[torch.randperm(n + extra, generator=g)]
    age = torch.arange(n + extra - 1, -1, -1)
    return LayerCandidates([big, small], block, age, [big_scale, small_scale])


def random_q(t: int, seed: int) -> torch.Tensor:
    return torch.randn(t, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("dim", [192, 190, 36])
def test_packing_matches_the_torch_reference(lib: Any, dim: int) -> None:
    x = anisotropic(16 * 40 + 7, dim, seed=dim)
    x[5] = 0.0  # a zero row: scale 0, no error
    keys = ltm_scan.ScanKeys(lib, dim, slack=1e-5)
    for lo, hi in [(0, 100), (100, 103), (103, 600), (600, x.shape[0])]:  # partial panels repacked on every add
        keys.add(x[lo:hi])
    assert keys.rows == x.shape[0]
    assert keys.channel is not None
    torch.testing.assert_close(keys.channel, ltm_scan.channel_divisor(x[:100]))
    whole = torch.nn.functional.pad(x / keys.channel, (0, 0, 0, -x.shape[0] % 16))
    panels, aux = ltm_scan.reference_pack(whole, slack=1e-5)
    assert torch.equal(keys.panels[: panels.shape[0]], panels)
    got = keys.aux[:, : x.shape[0]]
    want = aux[:, : x.shape[0]]
    assert bool((got >= want).all())  # rounded up, never below the float64 bound
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1, 2, 3, 7, 13, 25, 36])  # every query group size (16, 8, 4, 2, 1) and mixes
def test_vnni_and_portable_bounds_match_the_torch_reference(lib: Any, t: int) -> None:
    dim, n = 190, 16 * 30 + 9
    keys = ltm_scan.ScanKeys(lib, dim, slack=1e-4)
    keys.add(anisotropic(n, dim, seed=t))
    g = torch.Generator().manual_seed(100 + t)
    qv = torch.randn(t, dim, generator=g) * 0.1
    queries = ltm_scan.pack_queries(qv, torch.randn(t, generator=g), torch.rand(t, generator=g) + 0.5, keys)
    want_hi, want_lo = ltm_scan.reference_bounds(keys, n, queries)
    for plain in (False, True):
        got = ltm_scan.bounds(lib, keys, n, queries, plain=plain)
        torch.testing.assert_close(got.hi, want_hi, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.lo, want_lo, rtol=1e-5, atol=1e-5)
        pad = torch.full((-n % 16,), -torch.inf)
        torch.testing.assert_close(got.panel_hi, torch.cat([got.hi, pad]).reshape(-1, 16).amax(1))
        torch.testing.assert_close(got.panel_lo, torch.cat([got.lo, pad]).reshape(-1, 16).amax(1))


def exact_all(cand: LayerCandidates, q: torch.Tensor, scorer: str) -> torch.Tensor:
    """Every candidate's exact score as the index's rescoring computes it."""
    stats = KeyStats.of(cand.keys[0], cand.scale(0)) + KeyStats.of(cand.keys[1], cand.scale(1))
    ctx = ScoreContext(cand, q, scorer, stats if scorer == "max_z" else None)
    return ctx.subset(torch.arange(len(cand)))


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("scorer", SCAN_SCORERS)
def test_bounds_hold_the_exact_scores(lib: Any, kind: str, scorer: str) -> None:
    n = 3000
    cand = random_candidates(n, 0, 1, seed=7, kind=kind)
    q = random_q(9, 8)
    exact = exact_all(cand, q, scorer)
    index = ScanIndex(cand)
    assert index.scan is not None
    stats = KeyStats.of(cand.keys[0], cand.scale(0)) if scorer == "max_z" else None
    ctx = ScoreContext(cand, q, scorer, stats)
    queries = ltm_scan.pack_queries(query_vectors(q, KV_HEADS, scorer), ctx.mean, ctx.std, index.scan)
    b = ltm_scan.bounds(lib, index.scan, n, queries)
    assert bool((b.lo <= exact).all()) and bool((exact <= b.hi).all())
    # ...and tight enough to be of use: a small fraction of the score range.
    assert float((b.hi - b.lo).mean()) < 0.1 * float(exact.max() - exact.min())


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("scorer", SCAN_SCORERS)
def test_compiled_rescoring_matches_the_torch_scores(lib: Any, kind: str, scorer: str) -> None:
    cand = random_candidates(3000, 70, 1, seed=11, kind=kind)
    q = random_q(13, 12)
    stats = KeyStats.of(cand.keys[0], cand.scale(0)) + KeyStats.of(cand.keys[1], cand.scale(1))
    stats = stats if scorer == "max_z" else None
    index = torch.randperm(len(cand), generator=torch.Generator().manual_seed(13))[:900]
    want = ScoreContext(cand, q, scorer, stats).subset(index)
    got = ScanContext(cand, q, scorer, stats, lib).subset(index)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_listing_matches_torch(lib: Any) -> None:
    g = torch.Generator().manual_seed(3)
    n = 20000
    hi = torch.randn(n, generator=g)
    hi[17] = torch.nan
    b = ltm_scan.Bounds(hi, hi, torch.cat([hi, torch.full((-n % 16,), -torch.inf)]).reshape(-1, 16).amax(1), hi)
    for cut in (3.0, 0.5, -1.0):  # few, some, more than the first buffer holds
        listed, below = ltm_scan.list_above(lib, b, cut)
        want = torch.nonzero(~(hi < cut)).flatten()
        assert torch.equal(listed, want)
        assert below == float(hi[hi < cut].max())


# ---------------------------------------------------------------------------------------------- index


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("scorer", [*SCAN_SCORERS, "sigmoid_mean"])
@pytest.mark.parametrize(("block_size", "exact"), [(1, True), (8, True), (8, False), (5, False)])
def test_scan_returns_the_exact_selection(kind: str, scorer: str, block_size: int, exact: bool) -> None:
    seed = block_size * 3 + int(exact)
    cand = random_candidates(5000, 150, block_size, seed, kind=kind)
    q = random_q(7, seed + 1)
    want = ExactIndex(cand).select(q, scorer, 96, exact=exact)
    index = ScanIndex(cand)
    assert torch.equal(index.select(q, scorer, 96, exact=exact), want)
    assert index.fallbacks == 0


@pytest.mark.parametrize("scorer", SCAN_SCORERS)
def test_scan_with_unsorted_blocks_and_a_big_budget(scorer: str) -> None:
    cand = random_candidates(4000, 40, 6, seed=5, shuffle=True)
    q = random_q(5, 6)
    for budget in (60, 1500):
        want = ExactIndex(cand).select(q, scorer, budget, exact=True)
        assert torch.equal(ScanIndex(cand).select(q, scorer, budget, exact=True), want)


def test_scan_follows_a_growing_store_and_older_views() -> None:
    """Views of one growing buffer share the int8 copy; a shorter (older) view reads only its own rows."""
    n = 4000
    full = random_candidates(n, 0, 4, seed=9)
    buffer = full.keys[0]
    q = random_q(6, 10)
    for rows in (1000, 1003, 2500, 4000, 1800):
        cand = LayerCandidates([buffer[:rows], full.keys[1]], full.block[:rows], full.age[:rows])
        index = ScanIndex(cand)
        assert index.scan is not None and index.scan.rows >= rows
        want = ExactIndex(cand).select(q, "max_z", 64, exact=True)
        assert torch.equal(index.select(q, "max_z", 64, exact=True), want)
    assert index.scan is not None and index.scan.rows == n  # one copy, grown to the longest view


def test_readers_and_a_growing_store_in_threads() -> None:
    """Reads of shorter views stay exact while other threads grow the shared int8 copy (arrays get swapped)."""
    full = random_candidates(6000, 0, 4, seed=21)
    buffer = full.keys[0]
    q = random_q(6, 22)

    def view(rows: int) -> LayerCandidates:
        return LayerCandidates([buffer[:rows], full.keys[1]], full.block[:rows], full.age[:rows])

    want = {rows: ExactIndex(view(rows)).select(q, "max_z", 64, exact=True) for rows in (1500, 2000)}
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for i in range(12):
                rows = 1500 if i % 2 else 2000
                assert torch.equal(ScanIndex(view(rows)).select(q, "max_z", 64, exact=True), want[rows])
        except BaseException as exc:
            errors.append(exc)

    ScanIndex(view(2000))
    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for rows in range(2100, 6001, 300):  # grows (and reallocates) the copy while the readers read
        ScanIndex(view(rows))
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_make_index_falls_back_to_exact_without_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    cand = random_candidates(200, 0, 1, seed=1)
    assert isinstance(make_index("scan", cand), ScanIndex)
    monkeypatch.setattr(scan_module.native, "load", lambda: None)
    assert isinstance(make_index("scan", cand), ExactIndex)
