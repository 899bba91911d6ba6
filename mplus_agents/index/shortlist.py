"""Shortlist indexes: a nearest-neighbour search lists candidates, exact rescoring decides (issue 7, item 1).

The long-term store is the first candidate part; it is what grows to a million tokens, so it alone gets a
search structure (a backend). The staging cache and the older pool part are small and always listed whole.

Backends, all answering "top-k' inner products per query vector":
- `torch`: one GEMM + topk over the keys in place. Exact, nothing to maintain.
- `faiss` (flat `IndexFlatIP`): exact; holds a copy of the keys; faiss-gpu moves it to CUDA.
- `faiss_ivf` (`IndexIVFFlat`, `nprobe` of `nlist` lists): approximate, touches a few percent of the keys.

Maintenance follows the functional `MemoryState`. A store's rows below its length never change: merges append
into growth buffers that are only written past their filled length (state.Growth), and eviction builds new
tensors. So a backend is cached per (buffer, layer): a longer view of the same buffer adds only the new rows,
a shorter view (an older state) filters the extra ids out, and a new buffer (eviction, a loaded memory) gets a
new backend. The cache holds the buffer only weakly and drops the entry when the buffer dies, so a recycled
address can never meet an old index.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from typing import Any, Protocol

import torch

from mplus_agents import quant
from mplus_agents.index.base import (
    KeyStats,
    LayerCandidates,
    ScoreContext,
    certified_select,
    exact_scores,
    exact_select,
    is_sorted,
    query_vectors,
)
from mplus_agents.retrieval import flat_logits

FAISS_HINT = "the faiss long-term index needs faiss: pip install 'mplus-agents[faiss]' (or faiss-gpu for CUDA)"
STAT_SNAPSHOTS = 4
RETRAIN_GROWTH = 8
CACHE_ENTRIES = 256
"""Backends kept (one per layer and store buffer): 30 layers of ~8 users."""


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(FAISS_HINT) from err
    return faiss


def faiss_available() -> bool:
    try:
        import_faiss()
    except ImportError:
        return False
    return True


class Backend(Protocol):
    approximate: bool

    @property
    def ntotal(self) -> int: ...

    def add(self, keys: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Append rows [m, ...] (after the rows already held); int8 rows come with their `scale` [m, kv_heads]."""
        ...

    def search(self, qv: torch.Tensor, k: int, nprobe: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [m, k] int64, -1 where fewer than k rows; values [m, k] float32, descending)."""
        ...


class TorchFlat:
    """Reads a view of the store itself: no copy, and `add` only records how many rows are visible.

    int8 keys (with `scale` [n, kv_heads]) are dequantised, and half-precision keys widened, a chunk at a time
    (`retrieval.flat_logits`), so the shortlist's values are the exact path's products.
    """

    approximate = False

    def __init__(self, keys: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        self.keys, self.scale = keys, scale

    @property
    def ntotal(self) -> int:
        return int(self.keys.shape[0])

    def add(self, keys: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        raise AssertionError("TorchFlat views its store; build a new one for a longer view")

    def search(self, qv: torch.Tensor, k: int, nprobe: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        logits = flat_logits(qv, self.keys, self.scale)
        vals, ids = logits.topk(min(k, logits.shape[1]), dim=1)
        return ids, vals


class FaissBackend:
    """faiss `IndexFlatIP` (exact) or `IndexIVFFlat` (approximate); on CUDA when faiss-gpu is installed."""

    def __init__(self, dim: int, kind: str, device: torch.device) -> None:
        self.faiss = import_faiss()
        self.kind, self.dim = kind, dim
        self.nlist = 0
        self.trained_on = 0
        """Rows the IVF lists were trained for; `RETRAIN_GROWTH` times more and the index is rebuilt."""
        self.approximate = kind == "faiss_ivf"
        self.index: Any = None
        self.device = device
        if not self.approximate:
            self.index = self._to_device(self.faiss.IndexFlatIP(dim))

    def _to_device(self, index: Any) -> Any:
        if self.device.type == "cuda" and hasattr(self.faiss, "StandardGpuResources"):
            self.resources = self.faiss.StandardGpuResources()
            return self.faiss.index_cpu_to_gpu(self.resources, self.device.index or 0, index)
        return index

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def add(self, keys: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        if scale is not None:
            keys = quant.dequantize(keys, scale)
        x = keys.reshape(keys.shape[0], -1).detach().to("cpu", torch.float32).contiguous().numpy()
        if self.index is None:  # IVF: trained on the first rows it sees (a rebuild retrains)
            nlist = max(1, min(int(math.sqrt(x.shape[0])), x.shape[0] // 39))
            quantizer = self.faiss.IndexFlatIP(self.dim)
            index = self.faiss.IndexIVFFlat(quantizer, self.dim, nlist, self.faiss.METRIC_INNER_PRODUCT)
            sample = x[:: max(1, x.shape[0] // (48 * nlist))]  # faiss wants >= 39 points per list
            index.cp.niter = 10  # k-means on a sample only seeds the lists; recall is measured, not assumed
            index.train(sample)
            self.nlist, self.trained_on = nlist, int(x.shape[0])
            self.index = self._to_device(index)
        self.index.add(x)

    def search(self, qv: torch.Tensor, k: int, nprobe: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        x = qv.detach().to("cpu", torch.float32).contiguous().numpy()
        params = self.faiss.SearchParametersIVF(nprobe=min(nprobe, self.nlist)) if self.approximate else None
        vals, ids = self.index.search(x, min(k, self.ntotal), params=params)
        return torch.from_numpy(ids).long(), torch.from_numpy(vals).float()


class _Entry:
    def __init__(self, root: torch.Tensor, backend: Any) -> None:
        self.root = weakref.ref(root)
        self.backend = backend
        """A `Backend`, a scan copy (`index.scan`), or None (`TorchFlat` is made per read)."""
        self.rows = 0
        """Rows the backend holds."""
        self.stat_rows = 0
        self.stats: dict[int, KeyStats] = {}
        """Key statistics per store length, the newest `STAT_SNAPSHOTS` (a [D, D] float64 sum each)."""
        self.lock = threading.Lock()


_CACHE: OrderedDict[tuple[int, int, str], _Entry] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def _entry(keys: torch.Tensor, kind: str, make: Any) -> _Entry:
    root = _root(keys)
    key = (id(root), keys.data_ptr(), kind)
    with _CACHE_LOCK:
        entry = _CACHE.get(key)
        if entry is None or entry.root() is not root:
            entry = _Entry(root, make())
            _CACHE[key] = entry
            weakref.finalize(root, _forget, key, weakref.ref(entry))
            while len(_CACHE) > CACHE_ENTRIES:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(key)
    return entry


def _forget(key: tuple[int, int, str], entry: weakref.ref[_Entry]) -> None:
    with _CACHE_LOCK:
        live = entry()
        if live is not None and _CACHE.get(key) is live:
            del _CACHE[key]


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


class ShortlistIndex:
    """Shortlist with a backend over the long-term part, rescore exactly, prove, widen or fall back."""

    KINDS: tuple[str, ...] = ("torch", "faiss", "faiss_ivf")

    def __init__(
        self,
        cand: LayerCandidates,
        kind: str = "torch",
        *,
        indexed_parts: int = 1,
        shortlist_k: int = 128,
        max_k: int = 4096,
        nprobe: int = 16,
        sigmoid_proof: bool = False,
    ) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown shortlist backend {kind!r}")
        self.cand, self.kind = cand, kind
        self.shortlist_k, self.max_k, self.nprobe = shortlist_k, max_k, nprobe
        self.approximate = kind == "faiss_ivf"
        self.sigmoid_proof = sigmoid_proof
        """Try to prove `sigmoid_mean` selections too. Off by default: its bound (a mean over every query token
        and head of each one's k'-th sigmoid) sits far above the real top scores, so on random data and on
        SmolLM2 keys the proof failed on every read, and the shortlist pass for T x heads query vectors costs
        as much as exact scoring. Proven backends answer `sigmoid_mean` with the exact path instead."""
        self.fallbacks = 0
        """Reads answered by the exact path because no shortlist up to `max_k` was provable."""
        big = cand.keys[0] if indexed_parts and len(cand.keys) else None
        self.big = big if big is not None and big.shape[0] else None
        self.big_scale = cand.scale(0) if self.big is not None else None
        self.backend: Backend | None = None
        self.entry: _Entry | None = None
        if self.big is not None:
            self._attach(self.big)

    def _attach(self, keys: torch.Tensor) -> None:
        n = int(keys.shape[0])
        if self.kind == "torch":
            self.entry = _entry(keys, self.kind, lambda: None)
            self.backend = TorchFlat(keys, self.big_scale)
        else:
            dim, kind = int(keys[0].numel()), self.kind
            self.entry = _entry(keys, kind, lambda: FaissBackend(dim, kind, keys.device))
            with self.entry.lock:
                backend = self.entry.backend
                assert isinstance(backend, FaissBackend)
                if backend.approximate and n > RETRAIN_GROWTH * max(backend.trained_on, 1):
                    # Lists trained for a much smaller store grow long and slow: retrain on what is there now.
                    backend = self.entry.backend = FaissBackend(dim, kind, keys.device)
                    self.entry.rows = 0
                if n > self.entry.rows:
                    scale = None if self.big_scale is None else self.big_scale[self.entry.rows : n]
                    backend.add(keys[self.entry.rows : n], scale)
                    self.entry.rows = n
            self.backend = backend

    def __len__(self) -> int:
        return len(self.cand)

    def _stats(self) -> KeyStats:
        parts = self.cand.keys
        stats = None
        first = 0
        if self.big is not None and self.entry is not None:
            stats = self._big_stats(self.entry, self.big, self.big_scale)
            first = 1
        for part in range(first, len(parts)):
            if parts[part].shape[0]:
                more = KeyStats.of(parts[part], self.cand.scale(part))
                stats = more if stats is None else stats + more
        assert stats is not None
        return stats

    @staticmethod
    def _big_stats(entry: _Entry, big: torch.Tensor, scale: torch.Tensor | None) -> KeyStats:
        """Statistics for max_z, grown with the rows (computed on first use: other scorers never pay for them)."""
        n = int(big.shape[0])
        with entry.lock:
            if n > entry.stat_rows:
                last = entry.stats.get(entry.stat_rows)
                added = KeyStats.of(big[entry.stat_rows : n], None if scale is None else scale[entry.stat_rows : n])
                entry.stats[n] = added if last is None else last + added
                entry.stat_rows = n
                for old in sorted(entry.stats)[:-STAT_SNAPSHOTS]:
                    del entry.stats[old]
            found = entry.stats.get(n)
        return found if found is not None else KeyStats.of(big, scale)  # an older, shorter view: recompute

    def scores(self, q: torch.Tensor, scorer: str) -> torch.Tensor:
        return exact_scores(self.cand, q, scorer)

    def select(self, q: torch.Tensor, scorer: str, budget: int, *, exact: bool) -> torch.Tensor:
        n = len(self.cand)
        hopeless = scorer == "sigmoid_mean" and not (self.approximate or self.sigmoid_proof)
        if self.big is None or n <= budget or budget <= 0 or hopeless:
            return exact_select(self.cand, q, scorer, budget, exact=exact)
        assert self.backend is not None
        ctx = ScoreContext(self.cand, q, scorer, self._stats() if scorer == "max_z" else None)
        qv = query_vectors(q, int(self.big.shape[1]), scorer)
        n_big = int(self.big.shape[0])
        device = self.cand.block.device
        rest = torch.arange(n_big, n, device=device)  # small parts: always listed
        sorted_blocks = is_sorted(self.cand.block)
        k = self.shortlist_k
        while True:
            ids, vals = self.backend.search(qv, k, self.nprobe)
            complete = self.backend.ntotal <= k
            found = ids[(ids >= 0) & (ids < n_big)].to(device)
            listed = torch.unique(torch.cat([found, rest]))
            bound = -math.inf if complete else ctx.bound(vals[:, -1])
            got = certified_select(
                ctx, listed, bound, budget, exact=exact, sorted_blocks=sorted_blocks, trust_order=self.approximate
            )
            if got is not None:
                return got
            if complete or k >= self.max_k or 2 * listed.numel() >= n:  # a proof would cost what exact costs
                self.fallbacks += 1
                return exact_select(self.cand, q, scorer, budget, exact=exact)
            k = min(4 * k, self.max_k)


class FaissIndex(ShortlistIndex):
    """faiss shortlist (`flat`: exact, proven; `ivf`: approximate) with exact rescoring."""

    def __init__(self, cand: LayerCandidates, kind: str = "flat", **kw: Any) -> None:
        if kind not in ("flat", "ivf"):
            raise ValueError(f"FaissIndex kind must be 'flat' or 'ivf', got {kind!r}")
        import_faiss()
        super().__init__(cand, "faiss" if kind == "flat" else "faiss_ivf", **kw)


class _SharedTotal:
    """Scores of the `shared` selection for any candidate subset: the sum over scoring layers of each layer's
    exact score, standardised with that layer's mean and std over all candidates (estimated, see below)."""

    def __init__(self, cand: LayerCandidates, parts: list[tuple[ScoreContext, float, float]]) -> None:
        self.cand, self.parts = cand, parts

    def subset(self, index: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(index.numel(), dtype=torch.float32, device=index.device)
        for ctx, mean, std in self.parts:
            total += (ctx.subset(index).to(total.device) - mean) / (std + 1e-6)
        return total


def approximate_shared_select(
    indexes: dict[int, ShortlistIndex],
    queries: dict[int, torch.Tensor],
    scorer: str,
    budget: int,
    *,
    sample: int = 4096,
) -> torch.Tensor | None:
    """The engine's `shared` selection (one block choice from several scoring layers) through IVF shortlists.

    Approximate twice over, so only for `ltm_index="faiss_ivf"`: the candidates are the union of every layer's
    IVF shortlist, and each layer's standardisation (mean and std of its scores over ALL candidates, which no
    shortlist can give for a max over query tokens) is estimated on a fixed sample of `sample` candidates
    scored exactly; with `sample` >= the store it is exact. None when the exact path must answer (no store to
    search, or the shortlists do not fill the budget).
    """
    first = next(iter(indexes.values()))
    cand = first.cand
    n = len(cand)
    if n <= budget or any(ix.big is None or ix.backend is None for ix in indexes.values()):
        return None
    assert first.big is not None
    n_big = int(first.big.shape[0])
    device = cand.block.device
    found = [torch.arange(n_big, n, device=device)]
    if n <= sample:
        probe = torch.arange(n, device=device)
    else:  # a fixed, evenly spread sample: the same candidates for every layer and every read of this store
        probe = torch.linspace(0, n - 1, sample, device=device).long().unique()
    parts = []
    for layer, index in indexes.items():
        q = queries[layer]
        assert index.backend is not None and index.big is not None
        ctx = ScoreContext(index.cand, q, scorer, index._stats() if scorer == "max_z" else None)
        qv = query_vectors(q, int(index.big.shape[1]), scorer)
        ids, _ = index.backend.search(qv, index.shortlist_k, index.nprobe)
        found.append(ids[(ids >= 0) & (ids < n_big)].to(device))
        s = ctx.subset(probe)
        parts.append((ctx, float(s.mean()), float(s.std()) if s.numel() > 1 else 1.0))
    listed = torch.unique(torch.cat(found))
    total = _SharedTotal(cand, parts)
    return certified_select(
        total,  # type: ignore[arg-type]
        listed, -math.inf, budget, exact=False, sorted_blocks=is_sorted(cand.block), trust_order=True,
    )
