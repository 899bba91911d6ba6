"""The retriever's training signal (SPEC 5.1-5.3): mean-of-sigmoid weights and balanced binary cross-entropy."""

from __future__ import annotations

import torch

EPS = 1e-5


def retriever_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """w_j = mean_t sigmoid(q_t . k_j) (SPEC 5.1); q [T, dim] projected queries, k [n, dim] projected keys."""
    return torch.sigmoid(q @ k.T).mean(dim=0)


def balanced_bce(w: torch.Tensor, y: torch.Tensor, lambda_neg: float = 1.0) -> torch.Tensor:
    """SPEC 5.3: (mean_{y=1} -log(w+eps) + lambda_neg * mean_{y=0} -log(1-w+eps)) / (1 + lambda_neg).

    Means are over all (layer, token) pairs jointly, so callers flatten every layer's weights into `w`. A side
    with no tokens contributes 0 (M+ always has both; tiny planted tasks may not).
    """
    pos, neg = y > 0.5, y <= 0.5
    zero = w.new_zeros(())
    pos_term = -torch.log(w[pos] + EPS).mean() if bool(pos.any()) else zero
    neg_term = -torch.log(1 - w[neg] + EPS).mean() if bool(neg.any()) else zero
    return (pos_term + lambda_neg * neg_term) / (1 + lambda_neg)
