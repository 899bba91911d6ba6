"""The `hybrid` scorer's lexical half: words rebuilt from tokens, BM25 over blocks vs a loop reference."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mplus_agents import MemoryConfig, MPlusLLM
from mplus_agents.generation import SamplingConfig
from mplus_agents.lexical import BM25_B, BM25_K1, bm25_block_scores, word_hash
from mplus_agents.statefile import load_memory, save_memory


def bm25_reference(query: list[int], docs: dict[int, list[int]]) -> dict[int, float]:
    """Textbook BM25 (Lucene idf), one document at a time."""
    n = len(docs)
    avg = sum(sum(1 for w in d if w) for d in docs.values()) / n
    terms = sorted(set(w for w in query if w))
    out = {}
    for doc_id, words in docs.items():
        length = sum(1 for w in words if w)
        score = 0.0
        for t in terms:
            df = sum(1 for d in docs.values() if t in d)
            tf = words.count(t)
            idf = math.log((n - df + 0.5) / (df + 0.5) + 1.0)
            score += idf * tf * (BM25_K1 + 1) / (tf + BM25_K1 * (1 - BM25_B + BM25_B * length / max(avg, 1.0)))
        out[doc_id] = score
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bm25_block_scores_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    blocks = sorted(rng.randrange(12) for _ in range(300))
    words = [rng.choice([0, 0, 0, *range(1, 40)]) for _ in blocks]
    query = [rng.randrange(0, 45) for _ in range(6)]
    docs: dict[int, list[int]] = {}
    for b, w in zip(blocks, words, strict=True):
        docs.setdefault(b, []).append(w)
    expected = bm25_reference(query, docs)
    got = bm25_block_scores(torch.tensor(query), torch.tensor(words), torch.tensor(blocks))
    for i, b in enumerate(blocks):
        assert got[i].item() == pytest.approx(expected[b], rel=1e-5, abs=1e-6)


def test_no_query_word_gives_zero_scores() -> None:
    got = bm25_block_scores(torch.tensor([0, 0]), torch.tensor([5, 6, 7]), torch.tensor([0, 0, 1]))
    assert torch.equal(got, torch.zeros(3))


@pytest.mark.slow
def test_words_survive_tokenization_differences(smol: MPlusLLM) -> None:
    lex = smol.lexicon
    a = lex.word_ids(smol.encode("What is my locker code?"))
    b = lex.word_ids(smol.encode("My Locker code is 4812."))
    locker = word_hash("locker")
    assert locker in a.tolist() and locker in b.tolist()
    assert word_hash("4812") in b.tolist()
    # A word's id sits on its first token only, so BM25 counts words, not tokens.
    assert a.tolist().count(locker) == 1
    assert int((b != 0).sum()) == 5  # my, locker, code, is, 4812


@pytest.mark.slow
def test_hybrid_reads_the_turn_that_shares_the_question_words(smol: MPlusLLM, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = MemoryConfig(scorer="hybrid", pool_size=256, chunk_size=128, retrieve_tokens=64, read_pool_tokens=32)
    mem = smol.new_memory(cfg)
    rng = random.Random(0)
    topics = ["weather", "lunch", "traffic", "a movie", "the garden", "work", "a podcast", "the gym"]
    filler = [f"Today I thought about {rng.choice(topics)} for a while and it was fine." for _ in range(60)]
    fact = "My locker code at the swimming pool is 4812."
    mem.inject_many(filler[:10], roles=["user"] * 10)
    first = mem.state.next_block
    mem.inject(fact, role="user")
    fact_blocks = set(range(first, mem.state.next_block))
    for i in range(10, 60, 10):
        mem.inject_many(filler[i : i + 10], roles=["user"] * 10)
    assert not fact_blocks & set(mem.state.pool.block[0, -32:].tolist()), "the fact must have left the shown pool"
    gen = smol.start(smol.chat_prompt([{"role": "user", "content": "What is my locker code?"}]), mem,
                     SamplingConfig(max_new_tokens=1))
    list(gen.pieces)
    assert fact_blocks & set(gen.read.retrieved_blocks[0])
    # Word ids persist with the memory.
    save_memory(mem, tmp_path / "m.mplus")
    again = load_memory(smol, tmp_path / "m.mplus")
    assert again.state.ltm.word is not None
    assert torch.equal(again.state.pool.word, mem.state.pool.word)  # type: ignore[arg-type]


def test_hybrid_needs_the_input_source() -> None:
    with pytest.raises(ValueError, match="input source"):
        MemoryConfig(source="output", scorer="hybrid", drop_policy="random", selection="per_layer")
