"""Per-layer long-term indexes (issue 7, item 1): the exact torch reference, the int8 bound scan, shortlist paths.

`make_index(kind, cand)` is what the engine calls; `MemoryConfig.ltm_index` picks the kind.
"""

from __future__ import annotations

from mplus_agents.index.base import LayerCandidates, LTMIndex
from mplus_agents.index.exact import ExactIndex
from mplus_agents.index.scan import ScanIndex, scan_available
from mplus_agents.index.shortlist import (
    FaissIndex,
    ShortlistIndex,
    approximate_shared_select,
    clear_cache,
    faiss_available,
)

AUTO_MIN_TOKENS = 32768
"""`auto` uses the proven int8 scan (or, without the compiled kernels, the proven torch shortlist) from this many
long-term tokens per layer. Measured against exact (benchmarks/retrieval_bench.py, `max_z`, top-1,024 in blocks
of 64): the scan takes 0.68x the time at 10k and 0.06x at 1M; the torch shortlist 1.59x at 10k, 1.07x at 20k,
0.93x at 40k, 0.78x at 100k, 0.50x at 1M. Below this size a read takes a few ms either way, and the scan's int8
copy (D + 12 bytes per token and layer) is not worth holding. `auto` never picks an approximate index."""

__all__ = [
    "AUTO_MIN_TOKENS",
    "ExactIndex",
    "FaissIndex",
    "LTMIndex",
    "LayerCandidates",
    "ScanIndex",
    "ShortlistIndex",
    "approximate_shared_select",
    "clear_cache",
    "faiss_available",
    "make_index",
]


def make_index(kind: str, cand: LayerCandidates) -> LTMIndex:
    """The index of kind `exact`, `scan` (proven int8 scan), `torch` (proven torch shortlist), `faiss`,
    `faiss_ivf` or `auto`. `scan` without the compiled kernels or on CUDA keys is `exact` (same answers)."""
    if kind == "auto":
        big = len(cand.keys) and cand.keys[0].shape[0] >= AUTO_MIN_TOKENS
        kind = ("scan" if scan_available(cand) else "torch") if big else "exact"
    if kind == "scan":
        return ScanIndex(cand) if scan_available(cand) else ExactIndex(cand)
    if kind == "exact":
        return ExactIndex(cand)
    if kind == "faiss":
        return FaissIndex(cand, "flat")
    if kind == "faiss_ivf":
        return FaissIndex(cand, "ivf")
    if kind == "torch":
        return ShortlistIndex(cand, "torch")
    raise ValueError(f"unknown ltm_index {kind!r}")
