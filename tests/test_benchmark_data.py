"""The recall benchmark's synthetic conversation (benchmarks/conversation.py) must be a fair test.

A recall figure only means something if the data is deterministic, every answer can only come from the
fact's own turn (never from filler), and histories have the length the table says.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType

import pytest

from mplus_agents import MPlusLLM


def _load_conversation() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "conversation.py"
    spec = importlib.util.spec_from_file_location("bench_conversation", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


conv_mod = _load_conversation()
Conversation = conv_mod.Conversation


def _texts(conv: object, n: int) -> list[tuple[str, str | None]]:
    return [(t.text, t.fact) for t in itertools.islice(conv.stream(), n)]  # type: ignore[attr-defined]


def test_same_seed_same_conversation_other_seed_differs() -> None:
    a, b, c = Conversation(seed=3), Conversation(seed=3), Conversation(seed=4)
    assert a.facts == b.facts
    assert _texts(a, 400) == _texts(b, 400)
    assert _texts(a, 400) != _texts(c, 400)
    assert [f.answers for f in a.facts] != [f.answers for f in c.facts]


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_answers_only_in_their_own_fact_turn(seed: int) -> None:
    conv = Conversation(seed=seed, n_facts=20)
    facts = {f.key: f for f in conv.facts}
    assert len(facts) == 20
    for f in facts.values():
        assert f.answers[0].lower() in f.statement.lower(), f.key
        assert f.is_hit(f.statement.upper())  # scoring is case-insensitive
        assert not f.is_hit(f.question), f"{f.key}: the question gives its answer away"
    every_answer = [a.lower() for f in facts.values() for a in f.answers]
    stated = []
    for text, key in _texts(conv, 4000):
        if key is None:
            assert not any(a in text.lower() for a in every_answer), text
        else:
            stated.append(key)
            # A fact turn contains no other fact's answer either.
            others = [a.lower() for k, f in facts.items() if k != key for a in f.answers]
            assert not any(a in text.lower() for a in others), text
    assert sorted(stated) == sorted(facts)


def test_filler_is_varied_and_shares_words_with_questions() -> None:
    conv = Conversation(seed=0)
    filler = [text for text, key in _texts(conv, 3000) if key is None]
    assert len(set(filler)) > 0.8 * len(filler)
    vocabulary = set().union(*(conv_mod.word_tokens(t) for t in filler))
    assert len(vocabulary) > 400
    question_words = set().union(*(conv_mod.content_words(f.question) for f in conv.facts))
    # BM25 must rank, not just filter: many question words also occur in unrelated turns.
    assert len(question_words & vocabulary) >= 8


def test_some_questions_share_no_content_word_with_their_fact() -> None:
    facts = {f.key: f for f in Conversation(seed=0, n_facts=20).facts}
    no_overlap = {k for k, f in facts.items() if not f.lexical_overlap}
    assert {"job", "band", "trip", "language"} <= no_overlap
    assert "locker" not in no_overlap
    for key in no_overlap:
        f = facts[key]
        assert not conv_mod.content_words(f.statement) & conv_mod.content_words(f.question)


@pytest.mark.slow
def test_history_lengths_hit_their_targets(smol: MPlusLLM) -> None:
    def count(text: str) -> int:
        return len(smol.encode(smol.frame.render_item(text, "user")))

    conv = Conversation(seed=0)
    longest = max(count(t) for t, _ in _texts(conv, 2000))
    previous: list[object] = []
    for target in (1000, 4000, 12000):
        turns = conv.history(target, count)
        total = sum(count(t.text) for t in turns)
        assert target - longest < total <= target
        assert turns[: len(previous)] == previous  # a shorter history is a prefix of a longer one
        assert {t.fact for t in turns if t.fact} == {f.key for f in conv.facts}
        previous = turns
    end = conv_mod.facts_end_tokens(conv, count)
    assert 300 < end < 1000
    with pytest.raises(ValueError, match="too short"):
        conv.history(end - 1, count)


def test_benchmark_scripts_do_not_shadow_installed_modules() -> None:
    """A script runs with benchmarks/ first on sys.path, so a file named like an installed top-level module
    replaces it for every library (benchmarks/kernels.py once hid Hugging Face's `kernels` from transformers,
    and every benchmark died importing the model)."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    elsewhere = [p for p in sys.path if not p or Path(p).resolve() != bench]  # other tests may have added it
    clashes = [
        p.name for p in bench.glob("*.py")
        if p.stem in sys.builtin_module_names or importlib.machinery.PathFinder.find_spec(p.stem, elsewhere)
    ]
    assert clashes == []
