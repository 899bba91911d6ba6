"""Bad input (issue 2): each is refused with an `mplus_agents` error that names the problem, and a failed
injection leaves the memory exactly as it was."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mplus_agents import InvalidInputError, MemoryConfig, MPlusLLM, UnsupportedModelError
from mplus_agents.errors import ModelNotFoundError, PromptTooLongError
from mplus_agents.generation import SamplingConfig
from tests.conftest import CharTokenizer, tiny_llama


@pytest.fixture
def tiny() -> MPlusLLM:
    return MPlusLLM(tiny_llama(), CharTokenizer(), MemoryConfig(pool_size=256, chunk_size=64, injection_context=64))


def snapshot(mem) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in mem.state.tensors().items()}


def assert_unchanged(mem, before: dict[str, torch.Tensor], pending: list[int]) -> None:
    after = mem.state.tensors()
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert torch.equal(after[name], t), f"{name} changed"
    assert mem.pending == pending


# ---------------------------------------------------------------------------------------------- inject


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("   \n\t  ", "empty"),
        ("x" * 1_000_000, "1,000,000 characters"),
        (None, "got NoneType"),
        (5, "got int"),
        (b"my locker code is 4812", "got bytes"),
        (["a list"], "got list"),
    ],
    ids=["empty", "whitespace", "million-chars", "none", "int", "bytes", "list"],
)
def test_inject_refuses(tiny, text, problem) -> None:
    mem = tiny.new_memory()
    mem.inject("something worth keeping in memory", role="user")
    before, pending = snapshot(mem), list(mem.pending)
    with pytest.raises(InvalidInputError, match=problem):
        mem.inject(text)
    assert_unchanged(mem, before, pending)


@pytest.mark.parametrize("role", [5, "", "  ", b"user"])
def test_inject_refuses_bad_role(tiny, role) -> None:
    mem = tiny.new_memory()
    with pytest.raises(InvalidInputError, match="role"):
        mem.inject("a perfectly fine sentence", role=role)
    assert mem.stats().tokens_injected == 0


def test_inject_many_refuses_one_bad_text_among_good_ones(tiny) -> None:
    mem = tiny.new_memory()
    with pytest.raises(InvalidInputError, match="empty"):
        mem.inject_many(["a fine first turn", "  ", "a fine third turn"])
    assert mem.stats().tokens_injected == 0


def test_inject_many_refuses_mismatched_roles(tiny) -> None:
    mem = tiny.new_memory()
    with pytest.raises(InvalidInputError, match="one role per text"):
        mem.inject_many(["one", "two"], roles=["user"])


def test_failure_part_way_through_a_multi_chunk_injection_changes_nothing(tiny, monkeypatch) -> None:
    """An error inside the engine (out of memory, say) on the 2nd of several chunks: all or nothing."""
    mem = tiny.new_memory()
    mem.inject("an earlier turn that is already remembered, long enough for one chunk", role="user")
    before, pending = snapshot(mem), list(mem.pending)
    stats = mem.stats()

    real = tiny.engine.inject_input
    calls = {"n": 0}

    def fail_on_second_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny.engine, "inject_input", fail_on_second_chunk)
    with pytest.raises(RuntimeError, match="simulated"):
        mem.inject("a long text that the library must split into several chunks. " * 6, role="user")
    assert calls["n"] == 2, "the injection should have been split into several chunks"
    assert_unchanged(mem, before, pending)
    assert mem.stats() == stats

    monkeypatch.undo()
    mem.inject("the memory still works after the failure, as if it never happened", role="user")
    assert mem.stats().injections > stats.injections


# ---------------------------------------------------------------------------------------------- chat


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ("", "empty"),
        ("  \n ", "empty"),
        (None, "NoneType"),
        (5, "int"),
        (b"hello", "got bytes"),
        ([], "at least one message"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "last message"),
        ([{"role": "system", "content": "be brief"}], "last message"),
        ([{"role": "user"}], "str content"),
        ([{"role": "user", "content": 5}], "str content"),
        ([{"role": "robot", "content": "hi"}], "role"),
        ([{"content": "hi"}], "role"),
        (["hi"], "role"),
        ([{"role": "user", "content": ""}], "empty"),
    ],
    ids=[
        "empty",
        "whitespace",
        "none",
        "int",
        "bytes",
        "no-messages",
        "last-from-assistant",
        "only-system",
        "no-content",
        "int-content",
        "unknown-role",
        "no-role",
        "bare-string-in-list",
        "empty-user-content",
    ],
)
def test_chat_refuses(tiny, message, problem) -> None:
    mem = tiny.new_memory()
    with pytest.raises(InvalidInputError, match=problem):
        tiny.chat(message, memory=mem, max_new_tokens=2)


def test_chat_refuses_a_memory_of_another_llm(tiny) -> None:
    other = MPlusLLM(tiny_llama(), CharTokenizer())
    with pytest.raises(InvalidInputError, match="another MPlusLLM"):
        tiny.chat("hello", memory=other.new_memory(), max_new_tokens=2)


@pytest.mark.slow
def test_chat_refuses_bad_messages_with_the_real_tokenizer(smol) -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        smol.chat("   ", max_new_tokens=2)
    with pytest.raises(InvalidInputError, match="last message"):
        smol.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], max_new_tokens=2)
    mem = smol.new_memory()
    with pytest.raises(InvalidInputError, match="1,000,000 characters"):
        mem.inject("word " * 200_000, role="user")
    assert mem.stats().tokens_injected == 0


# ---------------------------------------------------------------------------------------------- models


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=128, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def test_unsupported_model_object(tmp_path) -> None:
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        MPlusLLM.from_pretrained(tiny_gpt2(), CharTokenizer())


def test_unsupported_model_directory(tmp_path) -> None:
    tiny_gpt2().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        MPlusLLM.from_pretrained(tmp_path, CharTokenizer())


def test_sliding_window_model_is_refused() -> None:
    model = tiny_llama()
    model.config.model_type = "mistral"
    model.config.sliding_window = 16
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        MPlusLLM(model, CharTokenizer())


def test_from_pretrained_needs_a_tokenizer_with_a_model_object() -> None:
    with pytest.raises(InvalidInputError, match="tokenizer"):
        MPlusLLM.from_pretrained(tiny_llama())


def test_nonexistent_model_directory_names_the_path(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*not a local model directory"):
        MPlusLLM.from_pretrained(missing)


def test_nonexistent_model_directory_is_an_mplus_error(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError):
        MPlusLLM.from_pretrained(tmp_path / "no-such-model")


# ---------------------------------------------------------------------------------------------- user ids


@pytest.mark.parametrize(
    ("user_id", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (None, "must be a str"),
        (5, "must be a str"),
        (b"ada", "must be a str"),
        ("a\x00b", "NUL"),
        ("x" * 1000, "at most"),
    ],
    ids=["empty", "whitespace", "none", "int", "bytes", "nul", "too-long"],
)
def test_memory_refuses_bad_user_id(tiny, user_id, problem) -> None:
    with pytest.raises(InvalidInputError, match=problem):
        tiny.memory(user_id)


def test_prompt_that_cannot_fit_the_positions_is_refused_before_any_work() -> None:
    llm = MPlusLLM(tiny_llama(max_position_embeddings=64), CharTokenizer())
    with pytest.raises(PromptTooLongError, match="exceeds the model's 64 positions"):
        llm.chat("x" * 80, max_new_tokens=4)
    assert llm.chat("short", max_new_tokens=4) is not None


def test_position_check_counts_only_what_a_read_places() -> None:
    """With `read_pool_tokens`, a full pool is mostly retrieval candidates: the bound is sink + shown pool +
    retrieval budget, so the longest prompt it admits must run, and one token more must be refused."""
    cfg = MemoryConfig(
        pool_size=256, chunk_size=64, min_chunk=17, injection_context=64, retrieve_tokens=32, block_size=8,
        read_pool_tokens=16,
    )
    llm = MPlusLLM(tiny_llama(max_position_embeddings=200), CharTokenizer(), cfg)
    mem = llm.new_memory()
    mem.inject("some filler text, " * 20, role="user")
    assert len(mem.state.pool) == 256 and mem.state.long_term_size() > 0
    room = 200 - len(llm.sink(cfg)) - 16 - 32 - 4  # the whole pool alone would leave no room at all
    gen = llm.start(llm.raw_prompt("q" * room), mem, SamplingConfig(max_new_tokens=4))
    "".join(gen.pieces)
    assert gen.read.pool_tokens == 16 and 0 < gen.read.retrieved_tokens <= 32
    assert gen.read.prefix_tokens + room + 4 <= 200  # the bound held: every position is one the model has
    with pytest.raises(PromptTooLongError):
        llm.start(llm.raw_prompt("q" * (room + 1)), mem, SamplingConfig(max_new_tokens=4))


def test_bytes_are_not_taken_for_a_message_list() -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer())
    with pytest.raises(InvalidInputError, match="takes a str or a list of messages, got bytes"):
        llm.chat(b"hi")  # type: ignore[arg-type]
