"""The long-term index protocol and the exact rescoring every shortlist path shares (SPEC 4.5, DESIGN 5).

A read asks one layer: "which `budget` long-term tokens, oldest first?". `ExactIndex` answers by scoring every
candidate (the reference in `retrieval.py`). A shortlist index answers by asking a nearest-neighbour search for
the top-k' keys per query vector, rescoring the union exactly, and proving that nothing outside the union could
have been selected; when it cannot prove it, it widens k' and finally falls back to the exact path. So a
shortlist that is itself exact (a flat search) never changes an answer; an approximate one (IVF) may, and says
so with `approximate = True`.

Why the proof works for each scorer (tau = the k'-th best inner product of a query vector, a bound for every
token that query did not list):
- `max_logit`: score = max_t l_t; a token in no list scores at most max_t tau_t.
- `max_z`: score = max_t (l_t - mean_t) / std_t with mean and std over ALL candidates. Both are functions of
  the query and of running key statistics (mean_t = q.mu, var_t = q^T Sigma q), so the standardisation stays
  exact with a shortlist, and the bound is max_t (tau_t - mean_t) / std_t.
- `sigmoid_mean`: score = mean over (t, head) of sigmoid(l_th); listing per (t, head) gives the bound
  mean sigmoid(tau_th). No single inner-product search computes this score, hence the rescoring.
Blocks score the max of their tokens, so a block whose best listed token beats the bound has its exact score,
and every block without a listed token scores at most the bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from mplus_agents import quant
from mplus_agents.ops import order_oldest_first
from mplus_agents.retrieval import head_mean_logits, max_z_scores, select_tokens, token_scores


@runtime_checkable
class LTMIndex(Protocol):
    """One layer's long-term candidates, searchable by a prompt's queries."""

    def __len__(self) -> int: ...

    def scores(self, q: torch.Tensor, scorer: str) -> torch.Tensor:
        """[n] float32 exact scores of every candidate (what `retrieval.token_scores` computes)."""
        ...

    def select(self, q: torch.Tensor, scorer: str, budget: int, *, exact: bool) -> torch.Tensor:
        """Token indices chosen for `budget`, oldest first (what `retrieval.select_tokens` returns)."""
        ...


@dataclass
class LayerCandidates:
    """One layer's candidates as parts that are never concatenated (the long-term store is big).

    keys: [n_i, kv_heads, head_dim] per part, in candidate order; block and age: [n] over all parts.
    scales: per part, None for float keys or [n_i, kv_heads] for int8 keys (`mplus_agents.quant`); every score
    is of the dequantised keys, so an index must read keys through `float_rows` / `gather_keys`.
    """

    keys: list[torch.Tensor]
    block: torch.Tensor
    age: torch.Tensor
    scales: list[torch.Tensor | None] | None = None

    def __post_init__(self) -> None:
        if self.scales is None:
            self.scales = [None] * len(self.keys)
        if len(self.scales) != len(self.keys):
            raise ValueError(f"{len(self.keys)} key parts but {len(self.scales)} scales")
        self.offsets = [0]
        for k in self.keys:
            self.offsets.append(self.offsets[-1] + int(k.shape[0]))

    def __len__(self) -> int:
        return self.offsets[-1]

    def scale(self, part: int) -> torch.Tensor | None:
        assert self.scales is not None
        return self.scales[part]

    def float_rows(self, part: int, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of part `part`: the keys themselves when float, dequantised (float32) when int8."""
        k, s = self.keys[part], self.scale(part)
        return k[start:stop] if s is None else quant.dequantize(k[start:stop], s[start:stop])

    def gather_keys(self, index: torch.Tensor) -> torch.Tensor:
        """Keys of rows `index` (order kept) without concatenating the parts; int8 rows dequantised."""
        first = self.keys[0]
        assert self.scales is not None
        dtype = torch.float32 if any(s is not None for s in self.scales) else first.dtype
        out = torch.empty(index.numel(), *first.shape[1:], dtype=dtype, device=first.device)
        ascending = index.numel() < 2 or bool((index[1:] >= index[:-1]).all())
        if ascending:  # each part's rows are one slice of `index` (what the indexes' listings are)
            cuts = torch.searchsorted(index, torch.tensor(self.offsets, device=index.device)).tolist()
        for part, (k, lo, hi) in enumerate(zip(self.keys, self.offsets, self.offsets[1:], strict=False)):
            where: slice | torch.Tensor = (
                slice(cuts[part], cuts[part + 1]) if ascending else (index >= lo) & (index < hi)
            )
            rows = index[where] - lo
            if rows.numel():
                s = self.scale(part)
                got = k.index_select(0, rows)  # 4x faster than k[rows] for a few thousand scattered rows
                if s is not None:
                    got = quant.dequantize(got, s.index_select(0, rows))
                out[where] = got.to(out.dtype)
        return out


def exact_scores(cand: LayerCandidates, q: torch.Tensor, scorer: str) -> torch.Tensor:
    """The reference scores over all parts (as `engine.Candidates.scores` computes them)."""
    used = [i for i, k in enumerate(cand.keys) if k.shape[0]]
    if not used:
        return torch.zeros(0, dtype=torch.float32)
    parts = [cand.keys[i] for i in used]
    scales = [cand.scale(i) for i in used]
    if scorer == "max_z":  # standardised over all candidates (on CUDA: the fused kernel when available)
        return max_z_scores(q, parts, scales)
    return torch.cat([token_scores(q.to(k.device), k, scorer, s) for k, s in zip(parts, scales, strict=True)])


def exact_select(cand: LayerCandidates, q: torch.Tensor, scorer: str, budget: int, *, exact: bool) -> torch.Tensor:
    return select_tokens(exact_scores(cand, q, scorer), cand.block, cand.age, budget, exact=exact)


# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class KeyStats:
    """Running sums over flattened keys [n, D] in float64: enough for every query's mean and std of q.k."""

    count: int
    total: torch.Tensor
    """[D] sum of keys."""
    gram: torch.Tensor
    """[D, D] sum of k k^T."""

    @classmethod
    def of(cls, keys: torch.Tensor, scale: torch.Tensor | None = None, chunk: int = 65536) -> KeyStats:
        """Statistics of `keys` [n, ...] (int8 keys with `scale` [n, kv_heads] are dequantised chunk by chunk)."""
        flat = keys.flatten(1)
        d = flat.shape[1]
        total = torch.zeros(d, dtype=torch.float64, device=flat.device)
        gram = torch.zeros(d, d, dtype=torch.float64, device=flat.device)
        for start in range(0, flat.shape[0], chunk):  # a float64 copy of the whole store would be 2x its size
            rows = keys[start : start + chunk]
            if scale is not None:
                rows = quant.dequantize(rows, scale[start : start + chunk])
            part = rows.flatten(1).to(torch.float64)
            total += part.sum(0)
            gram += part.T @ part
        return cls(int(flat.shape[0]), total, gram)

    def __add__(self, other: KeyStats) -> KeyStats:
        return KeyStats(self.count + other.count, self.total + other.total.to(self.total.device),
                        self.gram + other.gram.to(self.gram.device))

    def mean_std(self, qv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased std over the keys of qv.k for each row of qv [T, D] (torch.std's convention)."""
        q64 = qv.to(torch.float64)
        n = self.count
        mu = self.total / n
        mean = q64 @ mu
        second = ((q64 @ self.gram) * q64).sum(1)
        var = (second - n * mean * mean) / max(n - 1, 1)
        return mean, var.clamp_min(0).sqrt()


# ---------------------------------------------------------------------------------------------- queries


def query_vectors(q: torch.Tensor, kv_heads: int, scorer: str) -> torch.Tensor:
    """The inner-product queries [m, kv_heads*head_dim] whose per-query top-k' covers `scorer`.

    `max_logit`/`max_z`: one scaled group-mean query per prompt token (`head_mean_logits` folded into q).
    `sigmoid_mean`: one per (token, head), zero outside the head's KV slot, so q'.k = q_h.k_h / sqrt(hd).
    """
    t, heads, head_dim = q.shape
    groups = heads // kv_heads
    if scorer in ("max_logit", "max_z"):
        q_bar = q.float().reshape(t, kv_heads, groups, head_dim).mean(dim=2).reshape(t, kv_heads * head_dim)
        return q_bar * (1.0 / (math.sqrt(head_dim) * kv_heads))
    if scorer != "sigmoid_mean":
        raise ValueError(f"unknown scorer {scorer!r}")
    out = torch.zeros(t, heads, kv_heads, head_dim, dtype=torch.float32, device=q.device)
    for h in range(heads):
        out[:, h, h // groups] = q[:, h].float() / math.sqrt(head_dim)
    return out.reshape(t * heads, kv_heads * head_dim)


class ScoreContext:
    """Exact scores of any subset of one layer's candidates, and the bound for the unlisted ones."""

    def __init__(self, cand: LayerCandidates, q: torch.Tensor, scorer: str, stats: KeyStats | None) -> None:
        self.cand, self.q, self.scorer = cand, q, scorer
        self.mean = self.std = None
        if scorer == "max_z":
            if stats is None:
                raise ValueError("max_z needs key statistics over all candidates")
            kv_heads = cand.keys[0].shape[1]
            self.qv = query_vectors(q, kv_heads, scorer)
            mean, std = stats.mean_std(self.qv)
            self.mean, self.std = mean.float(), std.float() + 1e-6

    def subset(self, index: torch.Tensor) -> torch.Tensor:
        """[m] float32 exact scores of candidates `index`."""
        k = self.cand.gather_keys(index)
        if self.scorer != "max_z":
            return token_scores(self.q.to(k.device), k, self.scorer)
        assert self.mean is not None and self.std is not None
        if len(self.cand) < 2:
            return head_mean_logits(self.q, k).amax(dim=0)
        logits = head_mean_logits(self.q.to(k.device), k)
        return ((logits - self.mean[:, None]) / self.std[:, None]).amax(dim=0)

    def bound(self, kth: torch.Tensor) -> float:
        """Highest score a candidate listed by no query can have, given each query's k'-th inner product."""
        if self.scorer == "max_logit":
            return float(kth.max())
        if self.scorer == "max_z":
            assert self.mean is not None and self.std is not None
            return float(((kth - self.mean) / self.std).max())
        return float(torch.sigmoid(kth).mean())


# ---------------------------------------------------------------------------------------------- selection


def block_sizes(block: torch.Tensor, ids: torch.Tensor, sorted_blocks: bool) -> torch.Tensor:
    """How many candidates each block id in `ids` holds (all of them, listed or not)."""
    if sorted_blocks:
        return torch.searchsorted(block, ids, right=True) - torch.searchsorted(block, ids, right=False)
    return (block.unsqueeze(0) == ids.unsqueeze(1)).sum(1) if ids.numel() < 64 else torch.bincount(
        block - int(block.min()), minlength=int(block.max() - block.min()) + 1
    )[ids - int(block.min())]


def block_members(block: torch.Tensor, ids: torch.Tensor, sorted_blocks: bool) -> torch.Tensor:
    """Indices (ascending) of every candidate whose block is in `ids`."""
    if sorted_blocks and ids.numel():
        lo = torch.searchsorted(block, ids, right=False)
        hi = torch.searchsorted(block, ids, right=True)
        spans = [torch.arange(int(a), int(b), device=block.device) for a, b in zip(lo, hi, strict=True)]
        return torch.sort(torch.cat(spans)).values
    return torch.nonzero(torch.isin(block, ids)).flatten()


def is_sorted(block: torch.Tensor) -> bool:
    return block.numel() < 2 or bool((block[1:] >= block[:-1]).all())


def certified_select(
    ctx: ScoreContext,
    listed: torch.Tensor,
    bound: float,
    budget: int,
    *,
    exact: bool,
    sorted_blocks: bool,
    trust_order: bool = False,
) -> torch.Tensor | None:
    """`select_tokens` over all candidates, computed from the listed ones; None when that cannot be proven.

    ctx: anything with `.cand` and `.subset(index) -> exact scores` (a `ScoreContext`, or a layer combination).

    listed: ascending unique candidate indices. bound: no unlisted candidate scores above it. With
    `trust_order` (an approximate shortlist) the bound is ignored: the listed blocks are taken as the ranking,
    and only a shortlist too small to fill the budget gives None.
    """
    cand = ctx.cand
    n = len(cand)
    block, age = cand.block, cand.age
    scores = ctx.subset(listed)
    ids, inverse = torch.unique(block[listed], return_inverse=True)
    best = torch.full((ids.numel(),), -math.inf, dtype=torch.float32, device=scores.device)
    best = best.scatter_reduce(0, inverse, scores.to(best.device), reduce="amax", include_self=True)
    sizes = block_sizes(block, ids, sorted_blocks)
    by_id = torch.argsort(ids, descending=True)
    rank = by_id[torch.argsort(best[by_id], descending=True, stable=True)]
    cum = torch.cumsum(sizes[rank], dim=0)
    every_block = int(sizes.sum()) == n  # no block without a listed token
    every_token = listed.numel() == n  # only then are the listed blocks' maxima known without the bound
    if exact:
        take = int(torch.searchsorted(cum, torch.tensor(budget, device=cum.device), right=False)) + 1
        if take > ids.numel():  # the listed blocks do not fill the budget
            return None
        decisive = take
    else:
        take = int((cum <= budget).sum())
        if take == 0:
            take, exact = 1, True
        if take == ids.numel() and not every_block:  # a further, unlisted block might still fit
            return None
        decisive = min(take + 1, ids.numel())
    if not trust_order and not every_token and not bool((best[rank[:decisive]] > bound).all()):
        return None
    chosen = ids[rank[:take]]
    index = block_members(block, chosen, sorted_blocks)
    if exact and index.numel() > budget:
        last = chosen[-1]
        in_last = block[index] == last
        full, partial = index[~in_last], index[in_last]
        keep = budget - full.numel()
        partial = partial[ctx.subset(partial).topk(keep).indices]
        index = torch.cat([full, partial])
    return order_oldest_first(age, index)
