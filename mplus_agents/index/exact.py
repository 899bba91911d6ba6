"""`ExactIndex`: every candidate scored by the torch reference of `retrieval.py` (SPEC 4.5).

The baseline every other index is tested against, and the fallback a shortlist index uses when it cannot
prove its answer.
"""

from __future__ import annotations

import torch

from mplus_agents.index.base import LayerCandidates, exact_scores, exact_select


class ExactIndex:
    """No structure to maintain: scoring reads the stores in place, so it can never be stale."""

    approximate = False

    def __init__(self, cand: LayerCandidates) -> None:
        self.cand = cand

    def __len__(self) -> int:
        return len(self.cand)

    def scores(self, q: torch.Tensor, scorer: str) -> torch.Tensor:
        return exact_scores(self.cand, q, scorer)

    def select(self, q: torch.Tensor, scorer: str, budget: int, *, exact: bool) -> torch.Tensor:
        return exact_select(self.cand, q, scorer, budget, exact=exact)
