"""TokenStore.append (the amortised fast path) against plain concatenation, including forked views."""

from __future__ import annotations

import torch

from mplus_agents.state import MIN_CAPACITY, TokenStore


def random_store(layers: int, n: int, seed: int) -> TokenStore:
    g = torch.Generator().manual_seed(seed)
    return TokenStore(
        k=torch.randn(layers, n, 2, 4, generator=g),
        v=torch.randn(layers, n, 2, 4, generator=g),
        age=torch.randint(0, 100, (layers, n), generator=g),
        block=torch.randint(0, 100, (layers, n), generator=g),
        rf=torch.rand(layers, n, generator=g),
    )


def assert_same(a: TokenStore, b: TokenStore) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


def test_append_equals_cat_across_growth() -> None:
    plain = random_store(3, 5, 0)
    fast = plain.clone()
    for i in range(1, 40):
        other = random_store(3, 7 * i % 53 + 1, i)
        plain = plain.cat(other)
        fast = fast.append(other)
        assert_same(fast, plain)
    assert len(plain) > MIN_CAPACITY or fast.growth is not None


def test_older_view_never_sees_newer_writes() -> None:
    base = random_store(2, 10, 1).append(random_store(2, 3, 2))
    snapshot = base.clone()
    newer = base.append(random_store(2, 4, 3))
    fork = base.append(random_store(2, 6, 4))  # appending to the older view again must copy, not overwrite
    assert_same(base, snapshot)
    assert_same(newer, snapshot.cat(random_store(2, 4, 3)))
    assert_same(fork, snapshot.cat(random_store(2, 6, 4)))


def test_with_fields_keeps_growth_for_untouched_fields() -> None:
    store = random_store(2, 4, 5).append(random_store(2, 4, 6))
    aged = store.with_fields(age=store.age + 1)
    assert aged.growth is store.growth
    grown = aged.append(random_store(2, 2, 7))
    assert grown.growth is store.growth
    assert torch.equal(grown.age[:, :8], store.age + 1)


def test_nbytes_counts_what_tensors_holds_without_copying() -> None:
    from mplus_agents import MemoryConfig
    from mplus_agents.state import MemoryState

    ltm = random_store(2, 5, 8).append(random_store(2, 3, 9))  # a growth-buffer view, not contiguous
    empty = random_store(2, 0, 10)
    state = MemoryState(config=MemoryConfig(), pool=random_store(2, 4, 11), ltm=ltm, staging=empty)
    assert state.nbytes() == sum(t.numel() * t.element_size() for t in state.tensors().values())
