"""`ScanIndex`: exact long-term selection from an int8 scan, for a million tokens per layer on a CPU.

Why a scan and not a nearest-neighbour shortlist: `max_z` takes the best of ~25 query tokens, each standardised
over all candidates, so a per-query top-k' shortlist proves its answer only after the same [T, n] product that
exact scoring needs (benchmarks/retrieval_bench.py: 0.37 s against 0.74 s exact at 1M tokens). Here the
compiled kernel (`kernels/ltm_scan.c`) reads an int8 copy of the keys (a quarter of the float32 bytes) and
gives every token a lower and an upper bound of its exact score in one pass; then

1. cut = a value at least `need` tokens are known to reach (the `need`-th best panel maximum of the lower
   bounds: panels are disjoint, so their maxima are `need` different tokens; first need = budget / 16);
2. listed = every token whose upper bound reaches the cut; every other token scores below the largest
   upper bound left out;
3. the listed tokens are rescored exactly (the reference arithmetic) and `certified_select` proves that no
   unlisted token could change the selection; when it cannot, `need` grows fourfold (the bounds are reused)
   and finally the exact path answers.

So the answer is the exact path's whenever the proof holds, and the proof is checked on every read. Scorers:
`max_z` and `max_logit` (a max of per-query-token logits, which the bounds follow); `sigmoid_mean` goes to the
exact path. Needs the compiled kernels (a C compiler) and CPU tensors; `make_index` falls back to the exact
index otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mplus_agents.index.base import (
    LayerCandidates,
    ScoreContext,
    certified_select,
    exact_select,
    is_sorted,
    query_vectors,
)
from mplus_agents.index.shortlist import ShortlistIndex, _entry
from mplus_agents.kernels import ltm_scan, native

SCAN_SCORERS = ("max_z", "max_logit")


def scan_available(cand: LayerCandidates) -> bool:
    """Whether `ScanIndex` can serve these candidates: compiled kernels and CPU keys."""
    return bool(cand.keys) and cand.keys[0].device.type == "cpu" and native.load() is not None


class ScanContext(ScoreContext):
    """`ScoreContext` whose exact rescoring runs in the compiled kernel: torch spends 1.5 ms on the skinny
    [T, 192] x [192, m] product for a few thousand listed tokens, a plain C loop a fraction of that."""

    def __init__(self, cand: LayerCandidates, q: torch.Tensor, scorer: str, stats: Any, lib: Any) -> None:
        super().__init__(cand, q, scorer, stats)
        self.lib = lib
        if scorer != "max_z":  # max_z's context has them already
            self.qv = query_vectors(q, int(cand.keys[0].shape[1]), scorer)
        t = self.qv.shape[0]
        self.shift = self.mean if self.mean is not None else torch.zeros(t)
        self.scale = self.std if self.std is not None else torch.ones(t)

    def subset(self, index: torch.Tensor) -> torch.Tensor:
        return ltm_scan.rescore(self.lib, self.cand.gather_keys(index), self.qv, self.shift, self.scale)


class ScanIndex(ShortlistIndex):
    """int8 bound scan over the long-term part, exact rescoring of the tokens that can matter, proof."""

    KINDS = ("scan",)

    def __init__(self, cand: LayerCandidates, **kw: Any) -> None:
        lib = native.load()
        if lib is None:
            raise RuntimeError("the scan index needs the compiled CPU kernels (a C compiler; MPLUS_NATIVE unset)")
        self.lib = lib
        self.scan: ltm_scan.ScanKeys | None = None
        super().__init__(cand, "scan", **kw)

    def _attach(self, keys: torch.Tensor) -> None:
        n, dim = int(keys.shape[0]), int(keys[0].numel())
        slack = ltm_scan.rounding_slack(dim)
        self.entry = entry = _entry(keys, "scan", lambda: ltm_scan.ScanKeys(self.lib, dim, slack))
        with entry.lock:
            if n > entry.rows:
                entry.backend.add(self.cand.float_rows(0, entry.rows, n))
                entry.rows = n
        self.scan = entry.backend

    def select(self, q: torch.Tensor, scorer: str, budget: int, *, exact: bool) -> torch.Tensor:
        n = len(self.cand)
        if self.big is None or self.scan is None or n <= budget or budget <= 0 or scorer not in SCAN_SCORERS:
            return exact_select(self.cand, q, scorer, budget, exact=exact)
        ctx = ScanContext(self.cand, q, scorer, self._stats() if scorer == "max_z" else None, self.lib)
        n_big = int(self.big.shape[0])
        queries = ltm_scan.pack_queries(ctx.qv, ctx.mean, ctx.std, self.scan)
        found = ltm_scan.bounds(self.lib, self.scan, n_big, queries)
        rest = torch.arange(n_big, n)  # the small parts (staging, older pool): always listed
        sorted_blocks = is_sorted(self.cand.block)
        panels = found.panel_lo.numel()
        need = math.ceil(budget / ltm_scan.PANEL)  # blocks of >= 16 tokens: enough panels to fill the budget
        while True:
            need = min(need, panels)
            cut = float(torch.topk(found.panel_lo, need).values[-1])
            listed_big, below = ltm_scan.list_above(self.lib, found, cut)
            listed = torch.cat([listed_big, rest])
            got = certified_select(ctx, listed, below, budget, exact=exact, sorted_blocks=sorted_blocks)
            if got is not None:
                return got
            if need >= panels or 2 * listed.numel() >= n:  # a proof would cost what exact scoring costs
                self.fallbacks += 1
                return exact_select(self.cand, q, scorer, budget, exact=exact)
            need *= 4
