"""Chunking of injected text (SPEC 3.3, DESIGN 8.7): at most `chunk_size`, short tails rebalanced, lossless."""

from __future__ import annotations

import math

import pytest

from mplus_agents.chunking import split_chunks
from mplus_agents.config import MemoryConfig


def sizes(n: int, chunk_size: int, min_chunk: int) -> list[int]:
    return [len(c) for c in split_chunks(list(range(n)), chunk_size, min_chunk)]


@pytest.mark.parametrize(("chunk_size", "min_chunk"), [(8, 1), (8, 4), (9, 5), (33, 17), (512, 17), (512, 256)])
def test_chunk_invariants_over_every_length(chunk_size: int, min_chunk: int) -> None:
    # The same constraint MemoryConfig enforces, so a rebalanced tail can always reach min_chunk.
    assert 2 * min_chunk <= chunk_size + 1
    for n in range(0, 3 * chunk_size + 3):
        ids = [(7 * i + 3) % 101 for i in range(n)]
        chunks = split_chunks(ids, chunk_size, min_chunk)
        assert [t for c in chunks for t in c] == ids, "concatenation must give back the ids, in order"
        assert len(chunks) == math.ceil(n / chunk_size)
        assert all(1 <= len(c) <= chunk_size for c in chunks)
        if n >= min_chunk:
            assert all(len(c) >= min_chunk for c in chunks), (n, [len(c) for c in chunks])
        # Only the last two chunks may be shorter than chunk_size, and then they are balanced.
        assert all(len(c) == chunk_size for c in chunks[:-2])
        if len(chunks) >= 2 and len(chunks[-2]) < chunk_size:
            assert len(chunks[-2]) - len(chunks[-1]) in (0, 1)


def test_spec_numbers() -> None:
    """512-token chunks and at least 17 tokens (SPEC 3.3, 9.5 item 7)."""
    cfg = MemoryConfig.mplus()
    assert (cfg.chunk_size, cfg.min_chunk) == (512, 17)
    assert sizes(1024, 512, 17) == [512, 512]
    assert sizes(1030, 512, 17) == [512, 259, 259]  # a 6-token tail is merged and split evenly
    assert sizes(1040, 512, 17) == [512, 264, 264]  # a 16-token tail is one short of the minimum
    assert sizes(1041, 512, 17) == [512, 512, 17]  # 17 is long enough: kept as is
    assert sizes(513, 512, 17) == [257, 256]
    assert sizes(16, 512, 17) == [16]  # shorter than min_chunk as a whole: one short chunk, caller decides
    assert sizes(0, 512, 17) == []


def test_tail_of_exactly_min_chunk_is_not_touched() -> None:
    assert sizes(20 + 5, 10, 5) == [10, 10, 5]
    assert sizes(20 + 4, 10, 5) == [10, 7, 7]


@pytest.mark.parametrize(("chunk_size", "min_chunk"), [(0, 1), (8, 0), (8, 9)])
def test_bad_sizes_are_refused(chunk_size: int, min_chunk: int) -> None:
    with pytest.raises(ValueError, match="chunk"):
        split_chunks([1, 2, 3], chunk_size, min_chunk)


def test_input_is_not_modified() -> None:
    ids = list(range(25))
    split_chunks(ids, 10, 6)
    assert ids == list(range(25))
