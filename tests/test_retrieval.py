"""Retrieval (SPEC 4.5, DESIGN 5 and 8.5): scores against a naive per-element reference, block selection.

The references below are deliberately the slowest possible reading of the definitions in retrieval.py's
docstrings: one dot product at a time, with the GQA rule written out (query head h reads KV head
h // (heads / kv_heads), the grouping of Hugging Face's `repeat_kv`).
"""

from __future__ import annotations

import math

import pytest
import torch

from mplus_agents import retrieval
from mplus_agents.retrieval import projector_scores, select_tokens, token_scores


def reference_scores(q: torch.Tensor, k: torch.Tensor, scorer: str) -> torch.Tensor:
    t, heads, head_dim = q.shape
    n, kv_heads, _ = k.shape
    groups = heads // kv_heads
    q64, k64 = q.double(), k.double()
    out = torch.zeros(n, dtype=torch.float64)
    for j in range(n):
        logit = torch.zeros(t, heads, dtype=torch.float64)
        for ti in range(t):
            for h in range(heads):
                logit[ti, h] = torch.dot(q64[ti, h], k64[j, h // groups]) / math.sqrt(head_dim)
        if scorer == "sigmoid_mean":
            out[j] = torch.sigmoid(logit).mean()
        else:  # max_logit: mean over heads, then the best query token
            out[j] = max(float(logit[ti].mean()) for ti in range(t))
    return out


def random_qk(t: int, heads: int, kv_heads: int, n: int, head_dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, heads, head_dim, generator=g) * 2, torch.randn(n, kv_heads, head_dim, generator=g) * 2


@pytest.mark.parametrize("scorer", ["sigmoid_mean", "max_logit"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (4, 4), (8, 1), (9, 3)])
def test_token_scores_match_the_naive_reference(scorer: str, heads: int, kv_heads: int) -> None:
    q, k = random_qk(t=5, heads=heads, kv_heads=kv_heads, n=23, seed=heads * 10 + kv_heads)
    got = token_scores(q, k, scorer)
    assert got.dtype == torch.float32 and got.shape == (23,)
    torch.testing.assert_close(got.double(), reference_scores(q, k, scorer), rtol=1e-5, atol=1e-5)


def test_gqa_grouping_is_contiguous_not_interleaved() -> None:
    """Query head h reads KV head h // groups: with a different rule the scores would change."""
    q, k = random_qk(t=1, heads=4, kv_heads=2, n=6, seed=3)
    # Only the first two query heads are non-zero: both read KV head 0 under the contiguous rule.
    q[:, 2:] = 0
    k_only_head0 = k.clone()
    k_only_head0[:, 1] = 0
    torch.testing.assert_close(token_scores(q, k, "max_logit"), token_scores(q, k_only_head0, "max_logit"))
    k_only_head1 = k.clone()
    k_only_head1[:, 0] = 0
    assert not torch.allclose(token_scores(q, k, "max_logit"), token_scores(q, k_only_head1, "max_logit"))


@pytest.mark.parametrize("scorer", ["sigmoid_mean", "max_logit"])
def test_token_scores_across_the_chunk_boundary(scorer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    q, k = random_qk(t=3, heads=6, kv_heads=2, n=23, seed=7)
    whole = token_scores(q, k, scorer)
    monkeypatch.setattr(retrieval, "SCORE_CHUNK", 5)  # 23 = 4 full chunks + a tail of 3
    chunked = token_scores(q, k, scorer)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(chunked.double(), reference_scores(q, k, scorer), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(retrieval, "SCORE_CHUNK", 23)  # exactly one chunk
    torch.testing.assert_close(token_scores(q, k, scorer), whole)


def test_token_scores_in_bfloat16_follow_the_reference_loosely() -> None:
    q, k = random_qk(t=4, heads=6, kv_heads=2, n=17, seed=8)
    kb = k.to(torch.bfloat16)
    got = token_scores(q, kb, "sigmoid_mean")
    assert got.dtype == torch.float32
    ref = reference_scores(q.to(torch.bfloat16).float(), kb.float(), "sigmoid_mean")
    torch.testing.assert_close(got.double(), ref, rtol=0.02, atol=0.02)


def test_token_scores_edge_cases() -> None:
    q, k = random_qk(t=2, heads=4, kv_heads=2, n=0)
    assert token_scores(q, k, "max_logit").shape == (0,)
    q, k = random_qk(t=0, heads=4, kv_heads=2, n=5)
    assert torch.equal(token_scores(q, k, "max_logit"), torch.zeros(5))
    q, k = random_qk(t=2, heads=4, kv_heads=2, n=5)
    with pytest.raises(ValueError, match="scorer"):
        token_scores(q, k, "cosine")


def test_projector_scores_match_the_spec_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC 4.5 with a trained retriever: mean over query tokens of sigmoid(q . k), no scaling."""
    g = torch.Generator().manual_seed(1)
    q, keys = torch.randn(4, 16, generator=g), torch.randn(11, 16, generator=g)
    ref = torch.tensor([sum(torch.sigmoid(torch.dot(q[t], keys[j])) for t in range(4)) / 4 for j in range(11)])
    monkeypatch.setattr(retrieval, "SCORE_CHUNK", 4)
    torch.testing.assert_close(projector_scores(q, keys), ref)
    assert projector_scores(q[:0], keys).shape == (11,)


# ---------------------------------------------------------------------------------------------- selection


def chunked_blocks(n: int, size: int) -> torch.Tensor:
    return torch.arange(n) // size


def oldest_first_ages(n: int) -> torch.Tensor:
    """Index 0 was injected first: ages n-1 .. 0."""
    return torch.arange(n - 1, -1, -1)


def assert_oldest_first(age: torch.Tensor, index: torch.Tensor) -> None:
    pairs = [(-int(age[i]), int(i)) for i in index]
    assert pairs == sorted(pairs), "retrieved tokens must be ordered by age descending, ties by index"


@pytest.mark.parametrize("budget", [1, 7, 8, 10, 33])
def test_exact_selection_returns_exactly_the_budget(budget: int) -> None:
    n = 48
    scores = torch.rand(n, generator=torch.Generator().manual_seed(budget))
    block, age = chunked_blocks(n, 4), oldest_first_ages(n)
    index = select_tokens(scores, block, age, budget, exact=True)
    assert index.numel() == budget
    assert len(set(index.tolist())) == budget
    assert_oldest_first(age, index)
    # All blocks but at most one are whole; they are the best blocks by max score.
    chosen = block[index]
    counts = torch.bincount(chosen, minlength=12)
    partial = [b for b in range(12) if 0 < counts[b] < 4]
    assert len(partial) <= 1
    block_best = torch.stack([scores[block == b].max() for b in range(12)])
    ranked = torch.argsort(block_best, descending=True).tolist()
    assert set(chosen.tolist()) == set(ranked[: len(set(chosen.tolist()))])
    # The cut block gives its best tokens.
    for b in partial:
        taken = [int(i) for i in index if block[i] == b]
        members = (block == b).nonzero().flatten()
        best = members[scores[members].topk(len(taken)).indices]
        assert set(taken) == set(best.tolist())


@pytest.mark.parametrize("budget", [4, 10, 16, 30])
def test_non_exact_selection_takes_whole_blocks_within_budget(budget: int) -> None:
    n = 48
    scores = torch.rand(n, generator=torch.Generator().manual_seed(100 + budget))
    block, age = chunked_blocks(n, 4), oldest_first_ages(n)
    index = select_tokens(scores, block, age, budget, exact=False)
    assert index.numel() == (budget // 4) * 4
    counts = torch.bincount(block[index], minlength=12)
    assert set(counts.tolist()) <= {0, 4}, "only whole blocks"
    assert_oldest_first(age, index)


def test_non_exact_selection_never_exceeds_a_budget_smaller_than_a_block() -> None:
    n = 48
    scores = torch.rand(n, generator=torch.Generator().manual_seed(5))
    block, age = chunked_blocks(n, 16), oldest_first_ages(n)
    index = select_tokens(scores, block, age, 10, exact=False)
    assert index.numel() == 10
    best_block = int(torch.stack([scores[block == b].max() for b in range(3)]).argmax())
    assert set(block[index].tolist()) == {best_block}
    assert_oldest_first(age, index)


def test_block_score_is_the_best_token_of_the_block() -> None:
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.9, 0.0])
    block = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    index = select_tokens(scores, block, oldest_first_ages(8), 4, exact=True)
    assert index.tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("exact", [True, False])
def test_equal_block_scores_go_to_the_newer_block(exact: bool) -> None:
    n = 20
    scores = torch.ones(n)
    block = chunked_blocks(n, 4)  # block 4 is the newest
    index = select_tokens(scores, block, oldest_first_ages(n), 8, exact=exact)
    assert index.tolist() == [12, 13, 14, 15, 16, 17, 18, 19]
    # A tie between two of the best blocks while a worse one is older still.
    scores = torch.tensor([0.9] * 4 + [0.1] * 4 + [0.9] * 4 + [0.2] * 4)
    index = select_tokens(scores, chunked_blocks(16, 4), oldest_first_ages(16), 4, exact=exact)
    assert index.tolist() == [8, 9, 10, 11]


def test_budget_at_least_n_returns_everything_oldest_first() -> None:
    age = torch.tensor([3, 8, 8, 1, 5])
    scores = torch.rand(5)
    block = torch.arange(5)
    for budget in (5, 6, 100):
        for exact in (True, False):
            assert select_tokens(scores, block, age, budget, exact=exact).tolist() == [1, 2, 4, 0, 3]
    assert select_tokens(scores, block, age, 0, exact=True).numel() == 0
    assert select_tokens(scores[:0], block[:0], age[:0], 4, exact=True).numel() == 0


@pytest.mark.parametrize("seed", range(5))
def test_block_size_one_is_plain_top_k(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, budget = 200, 37
    scores = torch.randn(n, generator=g)
    block = torch.randperm(n, generator=g)  # unique ids, in no particular order
    age = torch.randint(0, 50, (n,), generator=g)  # with ties
    for exact in (True, False):
        index = select_tokens(scores, block, age, budget, exact=exact)
        assert set(index.tolist()) == set(scores.topk(budget).indices.tolist())
        assert_oldest_first(age, index)


def test_selection_order_uses_ages_not_positions() -> None:
    """Per-layer stores are not sorted by age (merged LTM then staging); the order comes from ages."""
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    age = torch.tensor([10, 40, 20, 40, 30, 0])
    index = select_tokens(scores, torch.arange(6), age, 4, exact=True)
    assert index.tolist() == [1, 3, 2, 0]


def test_max_z_matches_a_naive_reference() -> None:
    """max_z: per query token, standardise the head-mean logits over candidates, keep the best token."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(5, 6, 8, generator=g)
    k = torch.randn(40, 2, 8, generator=g)
    groups = 3
    naive = torch.empty(5, 40)
    for t in range(5):
        for j in range(40):
            naive[t, j] = sum(float(q[t, h] @ k[j, h // groups]) for h in range(6)) / 6 / 8**0.5
    z = (naive - naive.mean(1, keepdim=True)) / (naive.std(1, keepdim=True) + 1e-6)
    assert torch.allclose(token_scores(q, k, "max_z"), z.amax(0), atol=1e-4)


def test_candidates_score_parts_as_one_set() -> None:
    """Merged and staged candidates are scored in place; max_z must still standardise over both together."""
    import dataclasses

    from mplus_agents import MemoryConfig
    from mplus_agents.engine import Candidates
    from mplus_agents.state import MemoryState, TokenStore

    g = torch.Generator().manual_seed(3)

    def store(n: int, rf: bool) -> TokenStore:
        return TokenStore(
            k=torch.randn(2, n, 2, 8, generator=g), v=torch.randn(2, n, 2, 8, generator=g),
            age=torch.arange(n).expand(2, n).clone(), block=torch.arange(n).expand(2, n).clone(),
            rf=torch.ones(2, n) if rf else None,
        )  # fmt: skip

    empty = store(0, False)
    state = MemoryState(config=MemoryConfig(), pool=empty, ltm=store(30, True), staging=store(12, False))
    q = torch.randn(4, 6, 8, generator=g)
    joined = torch.cat([state.ltm.k, state.staging.k], dim=1)
    for scorer in ("max_z", "max_logit", "sigmoid_mean"):
        got = Candidates(state).scores(1, q, scorer)
        assert torch.allclose(got, token_scores(q, joined[1], scorer), atol=1e-5), scorer
    only_ltm = dataclasses.replace(state, staging=store(0, False))
    assert len(Candidates(only_ltm)) == 30
