"""Memory operations against SPEC 3.2 (random drop), 4.2 (ages), 4.3 (staging, merge, decay) and DESIGN 8.

Every stored token carries its identity in `k[:, :, 0, 0]`, so a test can tell exactly which tokens a
drop kept, where they went and in what order, per layer.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mplus_agents import ops
from mplus_agents.config import MemoryConfig
from mplus_agents.state import MemoryState, TokenStore

LAYERS = 3
KV_HEADS = 2
HEAD_DIM = 4


def config(**overrides: Any) -> MemoryConfig:
    """A small `input`-source config with M+'s random per-layer drops and no automatic merge."""
    base: dict[str, Any] = dict(
        source="input",
        pool_size=16,
        chunk_size=8,
        min_chunk=1,
        retrieve_tokens=0,
        drop_policy="random",
        selection="per_layer",
        block_size=1,
        ltm_merge_every=1000,
    )
    base.update(overrides)
    return MemoryConfig(**base)


def tokens(
    ids: list[int], *, layers: int = LAYERS, ages: list[int] | None = None, rf: list[float] | None = None, seed: int = 0
) -> TokenStore:
    """Random K/V whose channel [0, 0] is the token id, identical ids and ages on every layer."""
    n = len(ids)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(layers, n, KV_HEADS, HEAD_DIM, generator=g)
    k[:, :, 0, 0] = torch.tensor(ids, dtype=torch.float32)
    v = torch.randn(layers, n, KV_HEADS, HEAD_DIM, generator=g)
    age = torch.tensor(ages if ages is not None else [0] * n, dtype=torch.int64).expand(layers, n).clone()
    block = torch.tensor(ids, dtype=torch.int64).expand(layers, n).clone()
    rf_t = torch.tensor(rf, dtype=torch.float32).expand(layers, n).clone() if rf is not None else None
    return TokenStore(k=k, v=v, age=age, block=block, rf=rf_t)


def empty(*, with_rf: bool = False, layers: int = LAYERS) -> TokenStore:
    return TokenStore.empty(layers, KV_HEADS, HEAD_DIM, dtype=torch.float32, with_rf=with_rf)


def state(
    cfg: MemoryConfig,
    pool: TokenStore | None = None,
    ltm: TokenStore | None = None,
    staging: TokenStore | None = None,
    *,
    seed: int = 0,
    layers: int = LAYERS,
    next_block: int = 0,
) -> MemoryState:
    return MemoryState(
        config=cfg,
        pool=pool if pool is not None else empty(layers=layers),
        ltm=ltm if ltm is not None else empty(with_rf=True, layers=layers),
        staging=staging if staging is not None else empty(layers=layers),
        next_block=next_block,
        rng_state=torch.Generator().manual_seed(seed).get_state(),
    )


def ids_of(store: TokenStore) -> list[list[int]]:
    """Token ids per layer, in storage order."""
    return store.k[:, :, 0, 0].round().to(torch.int64).tolist()


def snapshot(s: MemoryState) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in s.tensors().items()}


# ---------------------------------------------------------------------------------------------- drops


def test_random_drop_keeps_n_minus_k_in_order_and_appends_new_on_the_right() -> None:
    n, k = 16, 4
    cfg = config(pool_size=n)
    s = state(cfg, pool=tokens(list(range(n))), seed=3)
    out = ops.add_to_pool(s, tokens(list(range(100, 100 + k)), seed=1))
    assert len(out.pool) == n
    assert len(out.staging) == k
    for layer in range(LAYERS):
        kept = ids_of(out.pool)[layer]
        dropped = ids_of(out.staging)[layer]
        assert kept[-k:] == [100, 101, 102, 103], "the new chunk must land whole, on the right"
        old = kept[:-k]
        assert len(old) == n - k
        assert old == sorted(old), "survivors keep their relative order"
        assert sorted(old + dropped) == list(range(n)), "each old token is either kept or dropped, once"
        assert dropped == sorted(dropped)


def test_random_drop_never_drops_new_tokens() -> None:
    """Over many seeds no new token ever leaves: the pool's right end is always the last chunk (SPEC 3.2)."""
    cfg = config(pool_size=8, chunk_size=4)
    for seed in range(40):
        s = state(cfg, pool=tokens(list(range(8))), seed=seed)
        out = ops.add_to_pool(s, tokens([100, 101, 102, 103]))
        assert all(row[-4:] == [100, 101, 102, 103] for row in ids_of(out.pool))
        assert all(max(row) < 100 for row in ids_of(out.staging))


def test_partial_overflow_drops_only_the_excess() -> None:
    cfg = config(pool_size=16)
    s = state(cfg, pool=tokens(list(range(14))))
    out = ops.add_to_pool(s, tokens([100, 101, 102, 103]))
    assert len(out.pool) == 16 and len(out.staging) == 2
    s = state(cfg, pool=tokens(list(range(10))))
    out = ops.add_to_pool(s, tokens([100, 101, 102, 103]))
    assert len(out.pool) == 14 and len(out.staging) == 0
    assert all(row == [*range(10), 100, 101, 102, 103] for row in ids_of(out.pool))


def test_layers_drop_independently() -> None:
    cfg = config(pool_size=64, chunk_size=16)
    s = state(cfg, pool=tokens(list(range(64)), layers=6), layers=6, seed=5)
    out = ops.add_to_pool(s, tokens(list(range(100, 116)), layers=6))
    dropped = [tuple(row) for row in ids_of(out.staging)]
    # Identical drops in all six layers would have probability C(64,16)^-5.
    assert len(set(dropped)) == 6
    # Every layer still dropped exactly K of its own old tokens.
    assert all(len(row) == 16 and len(set(row)) == 16 for row in dropped)


def test_oldest_policy_drops_the_first_tokens_of_every_layer() -> None:
    cfg = config(pool_size=16, drop_policy="oldest", selection="shared")
    s = state(cfg, pool=tokens(list(range(16))))
    out = ops.add_to_pool(s, tokens([100, 101, 102, 103, 104]))
    assert all(row == [*range(5, 16), 100, 101, 102, 103, 104] for row in ids_of(out.pool))
    assert all(row == [0, 1, 2, 3, 4] for row in ids_of(out.staging))


def test_unknown_policy_and_bad_chunks_are_refused() -> None:
    with pytest.raises(ValueError, match="drop policy"):
        ops.split_overflow(tokens(list(range(5))), 3, "lifo", torch.Generator())
    cfg = config(pool_size=8, chunk_size=4)
    with pytest.raises(ValueError, match="at least one"):
        ops.add_to_pool(state(cfg), tokens([]))
    with pytest.raises(ValueError, match="pool holds only"):
        ops.add_to_pool(state(cfg), tokens(list(range(9))))


def test_k_and_v_travel_with_their_token() -> None:
    """A drop is a gather over whole tokens: K, V, age and block of one token stay together."""
    cfg = config(pool_size=16)
    pool = tokens(list(range(16)), ages=list(range(16, 0, -1)), seed=9)
    new = tokens([100, 101, 102, 103], seed=10)
    out = ops.add_to_pool(state(cfg, pool=pool, seed=2), new)
    for store in (out.pool, out.staging):
        for layer, row in enumerate(ids_of(store)):
            for pos, tid in enumerate(row):
                src, src_pos = (new, tid - 100) if tid >= 100 else (pool, tid)
                assert torch.equal(store.k[layer, pos], src.k[layer, src_pos])
                assert torch.equal(store.v[layer, pos], src.v[layer, src_pos])


# ---------------------------------------------------------------------------------------------- ages, blocks


def test_ages_new_tokens_count_down_and_everything_else_ages_by_k() -> None:
    k = 5
    cfg = config(pool_size=16, drop_policy="oldest", selection="shared")
    pool = tokens(list(range(16)), ages=[40 - i for i in range(16)])
    ltm = tokens([200, 201], ages=[90, 70], rf=[10.0, 10.0])
    staging = tokens([300], ages=[50])
    out = ops.add_to_pool(state(cfg, pool=pool, ltm=ltm, staging=staging), tokens(list(range(100, 100 + k))))
    assert out.pool.age[:, -k:].tolist() == [[4, 3, 2, 1, 0]] * LAYERS
    # Kept pool tokens 5..15 had ages 35..25 and are k older now.
    assert out.pool.age[:, :-k].tolist() == [[40 - i + k for i in range(5, 16)]] * LAYERS
    # Staging: the old entry ages by k, then the dropped tokens 0..4 arrive with their advanced ages.
    assert ids_of(out.staging) == [[300, 0, 1, 2, 3, 4]] * LAYERS
    assert out.staging.age.tolist() == [[50 + k] + [40 - i + k for i in range(5)]] * LAYERS
    assert out.ltm.age.tolist() == [[90 + k, 70 + k]] * LAYERS
    assert out.ltm.age.dtype == torch.int64


def test_new_token_ages_helper() -> None:
    ages = ops.new_token_ages(2, 256)
    assert ages.shape == (2, 256)
    assert ages[0, 0] == 255 and ages[1, -1] == 0
    assert torch.equal(ages[0], torch.arange(255, -1, -1))


def test_blocks_are_numbered_per_chunk_and_never_span_two_chunks() -> None:
    cfg = config(pool_size=64, chunk_size=16, block_size=4)
    s = state(cfg, next_block=7)
    out = ops.add_to_pool(s, tokens(list(range(10))))
    assert out.pool.block[0].tolist() == [7, 7, 7, 7, 8, 8, 8, 8, 9, 9]
    assert out.next_block == 10
    out = ops.add_to_pool(out, tokens(list(range(20, 23))))
    assert out.pool.block[0, -3:].tolist() == [10, 10, 10]
    assert out.next_block == 11
    assert out.injections == 2 and out.since_merge == 2


# ---------------------------------------------------------------------------------------------- staging and merge


def test_dropped_tokens_are_staged_then_merged_on_schedule() -> None:
    """Dropped tokens wait in staging (searchable) and move to the LTM every `ltm_merge_every` injections."""
    cfg = config(pool_size=8, chunk_size=4, drop_policy="oldest", selection="shared", ltm_merge_every=3)
    s = state(cfg, pool=tokens(list(range(8))))
    next_id = 100
    for injection in range(1, 7):
        s = ops.add_to_pool(s, tokens(list(range(next_id, next_id + 4))))
        next_id += 4
        if injection % 3:
            assert len(s.staging) == 4 * (injection % 3)
            assert s.since_merge == injection % 3
        else:
            assert len(s.staging) == 0 and s.since_merge == 0
        assert len(s.ltm) == 12 * (injection // 3)
        assert s.long_term_size() == 4 * injection
    assert s.ltm.rf is not None
    assert torch.all(s.ltm.rf == cfg.ltm_initial_rf), "ltm_decay=0: entries keep the initial rf of 10"
    # Oldest policy: the LTM holds the first 24 tokens ever injected, in order.
    assert ids_of(s.ltm)[0] == [*range(8), *range(100, 116)]


def test_merge_gives_initial_rf_then_decays_once() -> None:
    cfg = config(ltm_decay=1.0, retrieve_tokens=0)
    s = state(cfg, ltm=tokens([1, 2], rf=[5.0, 3.0]), staging=tokens([3, 4, 5]))
    out = ops.merge_staging(s)
    assert out.ltm.rf is not None
    assert ids_of(out.ltm) == [[1, 2, 3, 4, 5]] * LAYERS
    assert out.ltm.rf.tolist() == [[4.0, 2.0, 9.0, 9.0, 9.0]] * LAYERS
    assert len(out.staging) == 0 and out.since_merge == 0


def test_an_ltm_entry_survives_exactly_ten_merges() -> None:
    """SPEC 4.3: rf starts at 10 and loses 1 per merge; it is evicted at the merge that brings it to 0."""
    cfg = MemoryConfig.mplus(
        source="input",
        pool_size=8,
        tokens_per_chunk=4,
        chunk_size=4,
        min_chunk=1,
        retrieve_tokens=0,
        ltm_merge_every=2,
        selection="per_layer",
        drop_policy="random",
    )
    assert cfg.ltm_initial_rf == 10.0 and cfg.ltm_decay == 1.0
    s = state(cfg, pool=tokens(list(range(8))))
    next_id = 100
    first_batch: set[int] | None = None
    merges = 0
    history: list[tuple[bool, list[float]]] = []
    while merges < 12:
        s = ops.add_to_pool(s, tokens(list(range(next_id, next_id + 4))))
        next_id += 4
        if s.since_merge != 0:
            continue
        merges += 1
        layer_ids = ids_of(s.ltm)[0]
        assert s.ltm.rf is not None
        if first_batch is None:
            first_batch = set(layer_ids)
            assert len(first_batch) == 8  # two injections' drops of 4
        present = [tid in first_batch for tid in layer_ids]
        history.append((any(present), [rf for rf, p in zip(s.ltm.rf[0].tolist(), present, strict=True) if p]))
    assert [alive for alive, _ in history] == [True] * 9 + [False] * 3
    assert [set(rfs) for _, rfs in history[:9]] == [{10.0 - m} for m in range(1, 10)]
    # In steady state the LTM holds exactly nine merges' worth of drops (SPEC 4.3: ~9 x 15,360 at M+ sizes).
    assert len(s.ltm) == 9 * 8


def test_undo_branch_keeps_everything_when_eviction_would_leave_too_few() -> None:
    """Evicting down to <= retrieve_tokens entries is refused and the round's decay undone (SPEC 4.3)."""
    ltm = tokens([1, 2, 3, 4, 5, 6, 7], rf=[1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    # Four entries would survive; with K0 = 4 that is not more than K0: evict nothing, undo the decay.
    out = ops.merge_staging(state(config(ltm_decay=1.0, retrieve_tokens=4), ltm=ltm))
    assert out.ltm.rf is not None
    assert ids_of(out.ltm) == [[1, 2, 3, 4, 5, 6, 7]] * LAYERS
    assert out.ltm.rf.tolist() == [[1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0]] * LAYERS
    # With K0 = 3, four survivors are enough: the three at rf 1 -> 0 go, the rest decay to 4.
    out = ops.merge_staging(state(config(ltm_decay=1.0, retrieve_tokens=3), ltm=ltm))
    assert out.ltm.rf is not None
    assert ids_of(out.ltm) == [[4, 5, 6, 7]] * LAYERS
    assert out.ltm.rf.tolist() == [[4.0] * 4] * LAYERS


def test_undo_branch_counts_merged_staging_entries() -> None:
    ltm = tokens([1, 2], rf=[1.0, 1.0])
    staging = tokens([3, 4, 5])
    out = ops.merge_staging(state(config(ltm_decay=1.0, retrieve_tokens=2), ltm=ltm, staging=staging))
    assert out.ltm.rf is not None
    assert ids_of(out.ltm) == [[3, 4, 5]] * LAYERS
    out = ops.merge_staging(state(config(ltm_decay=1.0, retrieve_tokens=3), ltm=ltm, staging=staging))
    assert out.ltm.rf is not None
    assert ids_of(out.ltm) == [[1, 2, 3, 4, 5]] * LAYERS
    assert out.ltm.rf.tolist() == [[1.0, 1.0, 10.0, 10.0, 10.0]] * LAYERS


def test_hard_cap_evicts_the_oldest_and_keeps_order() -> None:
    cfg = config(ltm_max_tokens=6)
    ltm = tokens([1, 2, 3, 4, 5], ages=[50, 10, 40, 20, 30], rf=[10.0] * 5)
    staging = tokens([6, 7, 8], ages=[5, 60, 1])
    out = ops.merge_staging(state(cfg, ltm=ltm, staging=staging))
    assert ids_of(out.ltm) == [[2, 3, 4, 5, 6, 8]] * LAYERS
    assert out.ltm.age.tolist() == [[10, 40, 20, 30, 5, 1]] * LAYERS


def test_hard_cap_through_injections() -> None:
    cfg = config(
        pool_size=8, chunk_size=4, drop_policy="oldest", selection="shared", ltm_max_tokens=10, ltm_merge_every=1
    )
    s = state(cfg, pool=tokens(list(range(8))))
    for i in range(6):
        s = ops.add_to_pool(s, tokens(list(range(100 + 4 * i, 104 + 4 * i))))
        assert len(s.ltm) <= 10
    # 24 tokens dropped in order 0..7, 100..115; the newest 10 remain.
    assert ids_of(s.ltm)[0] == [*range(106, 116)]


# ---------------------------------------------------------------------------------------------- statistics


def test_retention_follows_one_minus_k_over_n_to_the_t() -> None:
    """SPEC 3.2: after t injections a pool token survives with probability (1 - K/N)^t."""
    n, k, layers = 100, 25, 16
    cfg = config(pool_size=n, chunk_size=k)
    s = state(cfg, pool=tokens(list(range(n)), layers=layers), layers=layers, seed=11)
    for t in range(1, 9):
        s = ops.add_to_pool(s, tokens(list(range(1000 * t, 1000 * t + k)), layers=layers))
        kept = (s.pool.k[:, :, 0, 0] < n).sum().item() / (n * layers)
        expected = (1 - k / n) ** t
        if t == 1:
            assert kept == expected, "the first injection drops exactly K of the N original tokens per layer"
        assert abs(kept - expected) < 0.04, (t, kept, expected)
    # (1-K/N)^(N/K) -> 1/e for MemoryLLM's analysis; at N/K = 4 it is 0.316.
    assert math.isclose((1 - k / n) ** (n / k), 0.316, abs_tol=1e-3)


# ---------------------------------------------------------------------------------------------- purity, determinism


def test_input_state_is_never_mutated() -> None:
    cfg = config(pool_size=16, ltm_merge_every=1, ltm_decay=1.0, retrieve_tokens=1, ltm_max_tokens=5)
    s = state(
        cfg,
        pool=tokens(list(range(16)), ages=list(range(16, 0, -1))),
        ltm=tokens([200, 201, 202], ages=[99, 98, 97], rf=[1.0, 4.0, 9.0]),
        staging=tokens([300, 301], ages=[60, 61]),
        seed=4,
    )
    before = snapshot(s)
    counters = (s.injections, s.tokens_injected, s.next_block, s.since_merge)
    out = ops.add_to_pool(s, tokens([100, 101, 102, 103]))
    assert len(out.ltm) <= 5 and len(out.ltm) > 0  # the run went through drop, merge, decay and cap
    after = s.tensors()
    assert before.keys() == after.keys()
    for name, t in before.items():
        assert torch.equal(t, after[name]), f"add_to_pool wrote into the input state's {name}"
    assert (s.injections, s.tokens_injected, s.next_block, s.since_merge) == counters
    # Also for a merge on its own.
    before = snapshot(out)
    ops.merge_staging(out)
    for name, t in before.items():
        assert torch.equal(t, out.tensors()[name]), name


def test_drops_are_deterministic_given_the_rng_state() -> None:
    cfg = config(pool_size=32, chunk_size=8)

    def run(seed: int) -> MemoryState:
        s = state(cfg, pool=tokens(list(range(32))), seed=seed)
        for i in range(3):
            s = ops.add_to_pool(s, tokens(list(range(100 + 8 * i, 108 + 8 * i))))
        return s

    a, b, c = run(1), run(1), run(2)
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name]), name
    assert not torch.equal(a.pool.k, c.pool.k)
    # The generator state advances, so successive injections draw different permutations.
    s = state(cfg, pool=tokens(list(range(32))), seed=1)
    once = ops.add_to_pool(s, tokens(list(range(100, 108))))
    assert not torch.equal(once.rng_state, s.rng_state)
    again = ops.add_to_pool(s, tokens(list(range(100, 108))))
    assert torch.equal(once.pool.k, again.pool.k)


def test_order_oldest_first_breaks_ties_by_index() -> None:
    age = torch.tensor([5, 9, 5, 9, 1, 7])
    out = ops.order_oldest_first(age, torch.tensor([4, 3, 0, 2, 1]))
    assert out.tolist() == [1, 3, 0, 2, 4]
    assert ops.order_oldest_first(age, torch.zeros(0, dtype=torch.int64)).numel() == 0
