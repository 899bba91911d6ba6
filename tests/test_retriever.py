"""The trained-retriever path (SPEC 4.5): projector layout, keys written once, per-layer selection vs a reference."""

from __future__ import annotations

import pytest
import torch

from mplus_agents import MemoryConfig, MPlusLLM
from mplus_agents.engine import MPlusWeights
from mplus_agents.errors import InvalidInputError
from mplus_agents.generation import SamplingConfig
from mplus_agents.retriever import Retriever, kv_features
from tests.conftest import CharTokenizer, tiny_llama

WORDS = ["red", "blue", "gold", "iron", "salt", "jade"]
TEXTS = [f"note {i}: the {w} is kept in drawer {i * 7 % 11}" for i, w in enumerate(WORDS)]


def _retriever_llm(source: str, config: MemoryConfig) -> MPlusLLM:
    model = tiny_llama()
    s = model.config
    kv_dim = 2 * s.num_key_value_heads * (s.hidden_size // s.num_attention_heads)
    key_dim, key_input = (s.hidden_size, "hidden") if source == "output" else (kv_dim, "kv")
    torch.manual_seed(1)
    retriever = Retriever(s.num_hidden_layers, s.hidden_size, key_dim, dim=8, key_input=key_input).eval()  # type: ignore[arg-type]
    return MPlusLLM(model, CharTokenizer(), config, weights=MPlusWeights(retriever=retriever))


def test_projector_state_dict_names_match_the_release() -> None:
    r = Retriever(2, 16, 12, dim=4, encoder=True)
    names = set(r.state_dict())
    assert "query_proj.1.0.weight" in names and "key_proj.0.2.weight" in names
    assert "encoder_query_proj.1.2.weight" in names
    assert r.query_proj[0][0].weight.shape == (8, 16) and r.key_proj[0][2].weight.shape == (4, 8)
    assert all(m.bias is None for m in r.modules() if isinstance(m, torch.nn.Linear))


def test_keys_are_written_once_and_follow_tokens_into_the_long_term_store() -> None:
    cfg = MemoryConfig(pool_size=48, chunk_size=40, min_chunk=8, retrieve_tokens=16, block_size=4, scorer="retriever")
    llm = _retriever_llm("input", cfg)
    mem = llm.new_memory()
    for text in TEXTS:
        mem.inject(text)
    state = mem.state
    retriever = llm.engine.weights.retriever
    assert retriever is not None and len(state.ltm) > 0
    for store in (state.pool, state.ltm):
        assert store.score_key is not None
        for layer in range(store.layers):
            expected = retriever.keys(layer, kv_features(store.k[layer], store.v[layer]))
            torch.testing.assert_close(store.score_key[layer], expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["input", "output"])
def test_per_layer_selection_equals_reference(source: str) -> None:
    """Each layer takes the top tokens by mean_t sigmoid(f_q(norm(x_t)) . f_k) over its own input x."""
    extra = dict(tokens_per_chunk=8, drop_policy="random") if source == "output" else {}
    cfg = MemoryConfig(
        source=source,  # type: ignore[arg-type]
        pool_size=40,
        chunk_size=40,
        min_chunk=8,
        retrieve_tokens=6,
        block_size=1,
        selection="per_layer",
        scorer="retriever",
        **extra,  # type: ignore[arg-type]
    )
    llm = _retriever_llm(source, cfg)
    mem = llm.new_memory()
    for text in TEXTS:
        mem.inject(text)
    state = mem.state
    retriever = llm.engine.weights.retriever
    assert retriever is not None
    prompt = llm.raw_prompt("where is the gold")
    inputs: dict[int, torch.Tensor] = {}
    layers = llm.engine.arch.layers

    def keep_first_input(i: int):  # type: ignore[no-untyped-def]
        def hook(_module, args, kwargs) -> None:  # type: ignore[no-untyped-def]
            inputs.setdefault(i, (args or (kwargs["hidden_states"],))[0])

        return hook

    handles = [layer.register_forward_pre_hook(keep_first_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        gen = llm.start(prompt, mem, SamplingConfig(max_new_tokens=1))
        list(gen.pieces)
    finally:
        for h in handles:
            h.remove()
    assert gen.read is not None
    for layer in range(state.pool.layers):
        normed = llm.engine.arch.normed(layer, inputs[layer][0, prompt.query_index])
        q = retriever.queries(layer, normed)
        keys = torch.cat([s.score_key[layer] for s in (state.ltm, state.staging) if len(s)])  # type: ignore[index]
        blocks = torch.cat([s.block[layer] for s in (state.ltm, state.staging) if len(s)])
        scores = torch.sigmoid(q @ keys.T).mean(0)
        expected = sorted(blocks[scores.topk(cfg.retrieve_tokens).indices].tolist())
        assert gen.read.retrieved_blocks[layer] == expected


def test_retriever_scorer_needs_a_retriever() -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), MemoryConfig(pool_size=32, chunk_size=16, min_chunk=8))
    with pytest.raises(InvalidInputError, match="trained retriever"):
        llm.new_memory(MemoryConfig(pool_size=32, chunk_size=16, min_chunk=8, scorer="retriever"))
