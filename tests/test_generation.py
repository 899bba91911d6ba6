"""The decode loop (DESIGN 4): greedy and sampled picks, stop strings, eos, length, streaming.

`ScriptedLM` is a real, if tiny, language model for `stream_text`: its next-token logits come from a fixed
table indexed by position, and it records every token it is fed. The last tests run the whole path through
`MPlusLLM.chat` on a tiny random Llama.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from mplus_agents import MPlusLLM
from mplus_agents.generation import DecodeResult, SamplingConfig, pick_token, stream_text
from tests.conftest import CharTokenizer, tiny_llama

EOS = 0
CHARS = ["<eos>"] + [chr(c) for c in range(32, 127)] + ["\n"]
CHAR_ID = {c: i for i, c in enumerate(CHARS)}


class ScriptedLM:
    def __init__(self, table: torch.Tensor, vocab: Sequence[str] = CHARS) -> None:
        self.table = table
        self.vocab = vocab
        self.pos = 0
        self.fed: list[int] = []

    @classmethod
    def saying(cls, text: str, *, eos_after: bool = False, extra: int = 0) -> ScriptedLM:
        """Greedy decoding reproduces `text` one character per token (then eos, or more filler)."""
        ids = [CHAR_ID[c] for c in text] + ([EOS] if eos_after else []) + [CHAR_ID["z"]] * (extra + 1)
        table = torch.full((len(ids), len(CHARS)), -5.0)
        table[torch.arange(len(ids)), torch.tensor(ids)] = 5.0
        return cls(table)

    @classmethod
    def random(cls, rows: int, seed: int) -> ScriptedLM:
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(rows, len(CHARS), generator=g) * 2)

    def first(self) -> torch.Tensor:
        return self.table[0]

    def step(self, token: int) -> torch.Tensor:
        self.fed.append(token)
        self.pos += 1
        return self.table[self.pos]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


def run(lm: ScriptedLM, cfg: SamplingConfig) -> tuple[list[str], DecodeResult, list[int]]:
    """Pieces, the result, and how many tokens had been generated when each piece came out."""
    result = DecodeResult()
    pieces, when = [], []
    for piece in stream_text(lm.first(), lm.step, lm.decode, {EOS}, cfg, result):
        pieces.append(piece)
        when.append(len(result.token_ids))
    return pieces, result, when


# ---------------------------------------------------------------------------------------------- picking


def test_greedy_is_deterministic_and_is_the_argmax() -> None:
    outs = [run(ScriptedLM.random(41, seed=1), SamplingConfig(max_new_tokens=40))[1] for _ in range(2)]
    assert outs[0].token_ids == outs[1].token_ids
    table = ScriptedLM.random(41, seed=1).table
    expected = []
    for row in table[:40]:
        token = int(row.argmax())
        if token == EOS:
            break
        expected.append(token)
    assert outs[0].token_ids == expected


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed() -> None:
    def sample(seed: int) -> list[int]:
        cfg = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=seed)
        return run(ScriptedLM.random(41, seed=2), cfg)[1].token_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    greedy = run(ScriptedLM.random(41, seed=2), SamplingConfig(max_new_tokens=40))[1].token_ids
    assert sample(7) != greedy


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(max_new_tokens=40, temperature=1.5, top_k=1, seed=3),
        SamplingConfig(max_new_tokens=40, temperature=1.5, top_p=1e-6, seed=3),
    ],
)
def test_top_k_one_and_tiny_top_p_equal_greedy(cfg: SamplingConfig) -> None:
    greedy = run(ScriptedLM.random(41, seed=4), SamplingConfig(max_new_tokens=40))[1].token_ids
    assert run(ScriptedLM.random(41, seed=4), cfg)[1].token_ids == greedy


def test_top_k_and_top_p_only_sample_from_the_allowed_set() -> None:
    g = torch.Generator().manual_seed(5)
    for _ in range(60):
        logits = torch.randn(30, generator=g) * 2
        probs = torch.softmax(logits, 0)
        top3 = set(logits.topk(3).indices.tolist())
        order = probs.argsort(descending=True)
        nucleus = set(order[: int((probs[order].cumsum(0) < 0.6).sum()) + 1].tolist())
        assert pick_token(logits, SamplingConfig(temperature=1.0, top_k=3), g) in top3
        assert pick_token(logits, SamplingConfig(temperature=1.0, top_p=0.6), g) in nucleus


def test_temperature_one_samples_the_softmax() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.tensor([0.0, float(torch.log(torch.tensor(3.0)))])  # p = 0.25, 0.75
    cfg = SamplingConfig(temperature=1.0)
    draws = [pick_token(logits, cfg, g) for _ in range(2000)]
    assert abs(sum(draws) / len(draws) - 0.75) < 0.04


def test_sampling_config_validation() -> None:
    for bad in (
        dict(max_new_tokens=-1),
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(stop=("",)),
    ):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- length, eos


def test_max_new_tokens_is_respected_without_a_wasted_step() -> None:
    lm = ScriptedLM.saying("abcdefghij")
    pieces, result, _ = run(lm, SamplingConfig(max_new_tokens=6))
    assert result.token_ids == [CHAR_ID[c] for c in "abcdef"]
    assert result.finish_reason == "length"
    assert "".join(pieces) == result.text == "abcdef"
    assert len(lm.fed) == 5, "no forward pass after the last token"
    lm = ScriptedLM.saying("abc")
    pieces, result, _ = run(lm, SamplingConfig(max_new_tokens=0))
    assert pieces == [] and result.token_ids == [] and lm.fed == []


def test_eos_ends_generation_and_is_not_in_the_text() -> None:
    lm = ScriptedLM.saying("hello", eos_after=True, extra=5)
    pieces, result, _ = run(lm, SamplingConfig(max_new_tokens=50))
    assert result.finish_reason == "stop"
    assert result.token_ids == [CHAR_ID[c] for c in "hello"]
    assert "".join(pieces) == result.text == "hello"
    assert len(lm.fed) == 5


# ---------------------------------------------------------------------------------------------- stop strings, streaming


def test_stop_string_cuts_the_text_and_never_streams_its_start() -> None:
    lm = ScriptedLM.saying("It is 4812.\nUser: and more text here", extra=5)
    pieces, result, when = run(lm, SamplingConfig(max_new_tokens=60, stop=("\nUser:",)))
    assert result.text == "It is 4812."
    assert "".join(pieces) == "It is 4812."
    assert result.finish_reason == "stop"
    assert all("\n" not in p for p in pieces)
    assert len(lm.fed) == len("It is 4812.\nUser:") - 1, "generation stops at the token completing the stop"
    assert len(pieces) > 1 and when[0] < len(result.token_ids), "text is streamed, not only flushed at the end"


def test_the_earliest_of_several_stop_strings_wins() -> None:
    lm = ScriptedLM.saying("one two three four")
    _, result, _ = run(lm, SamplingConfig(max_new_tokens=40, stop=("four", " two")))
    assert result.text == "one"


def test_a_partial_stop_string_is_held_then_released() -> None:
    """'\\nUse' could start '\\nUser:' and must wait; once the text goes elsewhere it belongs to the reply."""
    stop = "\nUser:"
    lm = ScriptedLM.saying("ab\nUsed to it")
    pieces, result, when = run(lm, SamplingConfig(max_new_tokens=13, stop=(stop,)))
    assert result.text == "ab\nUsed to it" and result.finish_reason == "length"
    assert "".join(pieces) == result.text
    assert len(pieces) > 1
    emitted = ""
    for piece, generated in zip(pieces, when, strict=True):
        emitted += piece
        if generated == len(result.token_ids):
            continue  # the final flush: nothing can follow any more
        so_far = result.text[:generated]
        # No released character may belong to a suffix that could still grow into the stop string...
        open_starts = [j for j in range(len(so_far)) if stop.startswith(so_far[j:])]
        assert all(j >= len(emitted) for j in open_starts), (so_far, emitted)
        # ...and nothing is held back longer than a stop string could need.
        assert len(so_far) - len(emitted) <= len(stop) - 1


def test_stop_string_spanning_multi_character_tokens() -> None:
    vocab = ["<eos>", "Sure", ", ", "4812", ".\nUs", "er", ": ", "next", "Use", "d"]
    script = [1, 2, 3, 4, 5, 6, 7, 7]
    table = torch.full((len(script), len(vocab)), -5.0)
    table[torch.arange(len(script)), torch.tensor(script)] = 5.0
    lm = ScriptedLM(table, vocab)
    pieces, result, _ = run(lm, SamplingConfig(max_new_tokens=8, stop=("\nUser:",)))
    assert result.text == "Sure, 4812."
    assert "".join(pieces) == "Sure, 4812."
    assert all("\n" not in p and "U" not in p for p in pieces)


def test_incomplete_utf8_is_never_streamed() -> None:
    text = "né € 日本 ok"
    data = list(text.encode())
    eos = 256
    table = torch.full((len(data) + 1, 257), -5.0)
    table[torch.arange(len(data) + 1), torch.tensor([*data, eos])] = 5.0
    fed: list[int] = []

    def step(token: int) -> torch.Tensor:
        fed.append(token)
        return table[len(fed)]

    def decode(ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    result = DecodeResult()
    pieces = list(stream_text(table[0], step, decode, {eos}, SamplingConfig(max_new_tokens=100), result))
    assert "".join(pieces) == result.text == text
    assert all("\ufffd" not in p for p in pieces)
    assert result.finish_reason == "stop"


@pytest.mark.parametrize("seed", range(6))
def test_joined_pieces_equal_the_text_for_random_runs(seed: int) -> None:
    stops = (("e",), ("ab", "x!"), (), ("\n\n",), ("zz",), ("q",))[seed]
    cfg = SamplingConfig(max_new_tokens=50, temperature=1.2, seed=seed, stop=stops)
    lm = ScriptedLM.random(51, seed=seed)
    pieces, result, _ = run(lm, cfg)
    assert "".join(pieces) == result.text
    assert not any(s in result.text for s in stops)
    # A stop cut leaves text that is a prefix of everything decoded.
    assert lm.decode(result.token_ids).startswith(result.text)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_llm() -> MPlusLLM:
    return MPlusLLM(tiny_llama(), CharTokenizer())


def test_chat_stream_equals_non_stream(tiny_llm: MPlusLLM) -> None:
    mem = tiny_llm.new_memory()
    mem.inject("my locker code is 4812 and I live in Lisbon")
    text = tiny_llm.chat("what is my locker code", memory=mem, max_new_tokens=16)
    assert isinstance(text, str)
    pieces = list(tiny_llm.chat("what is my locker code", memory=mem, max_new_tokens=16, stream=True))
    assert "".join(pieces) == text
    assert len(pieces) >= 2, "stream=True should yield the reply incrementally"
    assert 0 < len(text) <= 16


def test_chat_stop_string_end_to_end(tiny_llm: MPlusLLM) -> None:
    text = tiny_llm.chat("hello there", max_new_tokens=20)
    assert isinstance(text, str) and len(text) >= 8
    stop = text[4:6]
    expected = text[: text.find(stop)]
    assert tiny_llm.chat("hello there", max_new_tokens=20, stop=[stop]) == expected
    prompt = tiny_llm.chat_prompt([{"role": "user", "content": "hello there"}])
    gen = tiny_llm.start(prompt, None, SamplingConfig(max_new_tokens=20, stop=(stop,)))
    assert "".join(gen.pieces) == gen.result.text == expected
    assert gen.result.finish_reason == "stop"


def test_chat_seeded_sampling_end_to_end(tiny_llm: MPlusLLM) -> None:
    text = tiny_llm.chat("hello there", max_new_tokens=10, temperature=1.0, seed=11)
    streamed = tiny_llm.chat("hello there", max_new_tokens=10, temperature=1.0, seed=11, stream=True)
    assert "".join(streamed) == text
