"""The `input` source is exact: with nothing dropped, memory equals the same text in context (DESIGN 3)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from mplus_agents import MemoryConfig, MPlusLLM
from tests.conftest import CharTokenizer, tiny_llama, tiny_qwen3


def plain_logits(llm: MPlusLLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(input_ids=torch.tensor([ids])).logits[0, -1]


def memory_logits(llm: MPlusLLM, mem, prompt_ids: list[int]) -> torch.Tensor:
    sink = llm.sink(mem.config)
    with torch.no_grad():
        logits, _, _, _ = llm.engine.read(
            mem.state, sink, torch.tensor(prompt_ids), torch.arange(len(prompt_ids))
        )
    return logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3])
def test_one_chunk_equals_context_tiny(make) -> None:
    llm = MPlusLLM(make(), CharTokenizer(), MemoryConfig(pool_size=512, chunk_size=256))
    mem = llm.new_memory()
    text = "the quick brown fox jumps over the lazy dog and remembers 4812"
    mem.inject(text)
    prompt = llm.encode("what is the code")
    header = [1]  # plain frame: the BOS token is the sink
    ids = header + llm.encode(text) + prompt
    assert rel_err(memory_logits(llm, mem, prompt), plain_logits(llm, ids)) < 1e-4


def test_many_chunks_equal_context_when_injection_sees_everything() -> None:
    cfg = MemoryConfig(pool_size=1024, chunk_size=40, min_chunk=17, injection_context=1024)
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), cfg)
    mem = llm.new_memory()
    texts = ["alpha beta gamma delta epsilon zeta", "eta theta iota kappa lambda mu nu xi omicron pi rho"]
    for t in texts:
        mem.inject(t)
    assert mem.stats().injections >= 3
    prompt = llm.encode("sigma tau")
    ids = [1, *(tok for t in texts for tok in llm.encode(t)), *prompt]
    assert rel_err(memory_logits(llm, mem, prompt), plain_logits(llm, ids)) < 1e-4


def test_empty_memory_equals_vanilla_model() -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer())
    mem = llm.new_memory()
    prompt = llm.encode("hello there")
    got = memory_logits(llm, mem, prompt)
    want = plain_logits(llm, [1, *prompt])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # and generation text is identical to greedy decoding of the plain model
    reply = llm.chat("hello there", memory=mem, max_new_tokens=8)
    ids = [1, *prompt]
    out = []
    cache = DynamicCache()
    with torch.no_grad():
        logits = llm.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1]
        for _ in range(8):
            tok = int(logits.argmax())
            if tok == 2:
                break
            out.append(tok)
            logits = llm.model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]
    assert reply == llm.tokenizer.decode(out)


@pytest.mark.slow
def test_one_chunk_equals_context_smollm2(smol: MPlusLLM) -> None:
    mem = smol.new_memory()
    text = "My sister Alice lives in Oslo and keeps bees. Her favourite number is 37."
    mem.inject(text, role="user")
    prompt = smol.chat_prompt([{"role": "user", "content": "Where does Alice live?"}])
    sink_ids = smol.encode(smol.frame.header)
    ids = sink_ids + smol.encode(smol.frame.render_item(text, "user")) + prompt.ids.tolist()
    assert rel_err(memory_logits(smol, mem, prompt.ids.tolist()), plain_logits(smol, ids)) < 1e-4


def test_bf16_model_reads_and_writes_memory() -> None:
    """Nothing is hard-coded to fp32: a bf16 model injects and reads, close to its fp32 twin."""
    text = "alpha beta gamma delta epsilon zeta eta theta"
    prompt = [5, 6, 7]
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        llm = MPlusLLM(tiny_llama().to(dtype), CharTokenizer(), MemoryConfig(pool_size=64, chunk_size=32, min_chunk=8))
        mem = llm.new_memory()
        mem.inject(text)
        assert mem.state.pool.k.dtype == dtype
        results[dtype] = memory_logits(llm, mem, prompt).float()
    assert rel_err(results[torch.bfloat16], results[torch.float32]) < 5e-2


def test_long_term_store_in_bf16_with_fp32_model() -> None:
    cfg = MemoryConfig(pool_size=40, chunk_size=32, min_chunk=8, retrieve_tokens=16, block_size=4,
                       ltm_dtype="bfloat16")
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), cfg)
    mem = llm.new_memory()
    for i in range(6):
        mem.inject(f"turn number {i} with some words")
    assert mem.stats().long_term_tokens > 0
    assert mem.state.ltm.k.dtype == torch.bfloat16 or mem.state.staging.k.dtype == torch.bfloat16
    reply = llm.chat("turn number 2", memory=mem, max_new_tokens=4)
    assert isinstance(reply, str)


def test_auto_score_layers_spread_and_validation() -> None:
    from mplus_agents.config import auto_score_layers

    assert auto_score_layers(30) == (12, 15, 18, 21, 24)
    assert auto_score_layers(3) == (0, 1, 2)
    assert MemoryConfig(score_layers=(0, 2)).scoring_layers(3) == (0, 2)
    with pytest.raises(ValueError, match="out of range"):
        MemoryConfig(score_layers=(5,)).scoring_layers(3)


def test_chat_prompt_takes_any_role_and_a_reply_prefix() -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer())
    messages = [{"role": "tool", "content": "42"}, {"role": "user", "content": "what did the tool say"}]
    plain = llm.chat_prompt(messages)
    forced = llm.chat_prompt(messages, reply_prefix="answer:")
    assert forced.ids.tolist() == plain.ids.tolist() + llm.encode("answer:")
    assert torch.equal(forced.query_index, plain.query_index)


def test_closing_a_stream_early_reports_cancelled() -> None:
    from mplus_agents.generation import SamplingConfig

    llm = MPlusLLM(tiny_llama(), CharTokenizer())
    gen = llm.start(llm.raw_prompt("hello"), None, SamplingConfig(max_new_tokens=20))
    next(gen.pieces)
    gen.pieces.close()  # type: ignore[attr-defined]
    assert gen.result.finish_reason == "cancelled"


def test_memory_per_user_with_its_own_config() -> None:
    from mplus_agents import MemoryMismatchError

    llm = MPlusLLM(tiny_llama(), CharTokenizer())
    docs = MemoryConfig(pool_size=256, chunk_size=128, retrieve_tokens=64)
    mem = llm.memory("docs", config=docs)
    assert mem.config == docs and llm.memory("docs") is mem
    with pytest.raises(MemoryMismatchError, match="another config"):
        llm.memory("docs", config=MemoryConfig())


def test_shared_read_leaves_no_hooks_and_retrieves() -> None:
    """The pre-pass stops after the last scoring layer by raising; every hook must still be removed."""
    cfg = MemoryConfig(pool_size=40, chunk_size=32, min_chunk=8, retrieve_tokens=16, block_size=4, score_layers=(1,))
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), cfg)
    mem = llm.new_memory()
    for i in range(6):
        mem.inject(f"turn number {i} with some words")
    assert mem.stats().long_term_tokens > 0
    sink = llm.sink(cfg)
    with torch.no_grad():
        _, _, _, info = llm.engine.read(mem.state, sink, torch.tensor([5, 6, 7]), torch.arange(3))
    assert 0 < info.retrieved_tokens <= 16
    for module in llm.model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_pool_hidden_from_the_read_is_retrievable_and_exact_when_all_retrieved() -> None:
    """read_pool_tokens=0 with a budget covering everything reads the same prefix as showing the whole pool."""
    base = MemoryConfig(pool_size=512, chunk_size=64, min_chunk=8, block_size=8)
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), base)
    mem = llm.new_memory()
    for i in range(5):
        mem.inject(f"turn number {i} says something else")
    prompt = llm.encode("turn number 3")
    whole = memory_logits(llm, mem, prompt)
    hidden = base.replace(read_pool_tokens=0, retrieve_tokens=10_000)
    other = llm.new_memory(hidden)
    other.replace_state(dataclasses.replace(mem.state, config=hidden))
    assert rel_err(memory_logits(llm, other, prompt), whole) < 1e-5
    small = base.replace(read_pool_tokens=8, retrieve_tokens=16)
    third = llm.new_memory(small)
    third.replace_state(dataclasses.replace(mem.state, config=small))
    with torch.no_grad():
        _, _, _, info = llm.engine.read(third.state, llm.sink(small), torch.tensor(prompt), torch.arange(len(prompt)))
    assert info.pool_tokens == 8 and 0 < info.retrieved_tokens <= 16
