"""Loading and writing M+ checkpoint directories (issue 6 items 1-2) against the slow literal reference.

`tests/checkpoint_factory.py` writes tiny random checkpoints by hand in the published layouts: an mplus-8b
style one (STM + shipped LTM with keys / ages / recall counters, retriever projectors, llama3 rope, two PEFT
LoRA adapters) and a MemoryLLM-8B style one (STM only, linear RoPE scaling 1.8125). The reference of
`test_output_source.py` (every decoder layer rebuilt from its weights, SPEC 2.3 / 3.1) runs on plain HF models
holding the merged weights W + (alpha/r) B A of one adapter: the update adapter's model for injection, the
generation adapter's for stored K/V and reads. So a mix-up of adapters, a lost rope scaling, a wrongly mapped
PEFT name or a shipped memory read under the wrong adapter all fail here.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mplus_agents import MemoryConfig, MemoryState, MPlusLLM
from mplus_agents.checkpoints import is_checkpoint, load_checkpoint, save_checkpoint
from mplus_agents.errors import CheckpointError, InvalidInputError, ModelNotFoundError
from mplus_agents.generation import SamplingConfig
from mplus_agents.lora import LoRA
from mplus_agents.model import Prompt
from tests.checkpoint_factory import Published, rewrite, write_published
from tests.conftest import CharTokenizer, tiny_llama
from tests.test_output_source import TOL, reference_injection, reference_kv, reference_logits, rel_err, rms_norm
from tests.test_retriever import TEXTS, _retriever_llm

K = 4  # num_tokens of the factory's checkpoints


def load(path: Path, **kwargs: Any) -> MPlusLLM:
    return MPlusLLM.from_pretrained(path, tokenizer=CharTokenizer(), **kwargs)


def ids_of(n: int, seed: int) -> list[int]:
    return [int(i) for i in torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(seed))]


def inject(llm: MPlusLLM, state: MemoryState, chunk: list[int]) -> MemoryState:
    """One chunk through the engine (bypasses min_chunk so short chunks C < K are covered too)."""
    return llm.engine.inject_output(state, llm.sink(state.config), torch.tensor(chunk))


@pytest.fixture(scope="module")
def mplus(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return write_published(tmp_path_factory.mktemp("ck") / "mplus", "mplus")


@pytest.fixture(scope="module")
def memoryllm(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return write_published(tmp_path_factory.mktemp("ck") / "memoryllm", "memoryllm")


# ---------------------------------------------------------------------------------------------- reference


def check_injections(pub: Published, llm: MPlusLLM, state: MemoryState, lengths: list[int]) -> MemoryState:
    """Every chunk's new memory equals the reference under the update adapter; stored K/V are the generation
    adapter's."""
    upd, gen = pub.merged_model("default"), pub.merged_model(pub.generation_adapter)
    bos, e_new = pub.raw["bos_embedding"], pub.raw["new_memory_positional_emb"].reshape(-1)
    for i, length in enumerate(lengths):
        chunk = ids_of(length, 100 + i)
        before = state
        assert before.pool.hidden is not None
        state = inject(llm, before, chunk)
        with torch.no_grad():
            want = reference_injection(upd, bos, e_new, before.pool.hidden, chunk, K)
            wrong = reference_injection(gen, bos, e_new, before.pool.hidden, chunk, K)
        if pub.generation_adapter != "default":
            assert rel_err(wrong, want) > 100 * TOL  # the adapters differ enough for a mix-up to show
        assert state.pool.hidden is not None
        assert rel_err(state.pool.hidden[:, -K:], want) < TOL, length
        for layer in range(pub.layers):
            with torch.no_grad():
                k, v = reference_kv(gen, layer, want[layer])
            assert rel_err(state.pool.k[layer, -K:], k) < TOL
            assert rel_err(state.pool.v[layer, -K:], v) < TOL
    return state


def frozen_prefix(pub: Published, gen: Any, state: MemoryState, query_index: torch.Tensor) -> Any:
    """[BOS_l, top-K0 long-term rows by mean sigmoid(f_q . f_k) oldest first, pool_l], chosen on the first call
    (the prompt) and frozen for the decode steps (SPEC 7.2)."""
    budget = state.config.retrieve_tokens
    bos = pub.raw["bos_embedding"]
    parts = [p for p in (state.ltm, state.staging) if len(p)]
    cand = torch.cat([p.hidden for p in parts], dim=1) if parts else None  # type: ignore[misc]
    ages = torch.cat([p.age for p in parts], dim=1) if parts else None
    chosen: dict[int, torch.Tensor] = {}
    assert state.pool.hidden is not None
    pool = state.pool.hidden

    def prefix_of(layer: int, x: torch.Tensor) -> torch.Tensor:
        if layer not in chosen:
            if cand is None or budget == 0:
                chosen[layer] = bos[layer][:0]
            else:
                norm = gen.model.layers[layer].input_layernorm
                q = pub.projector("query_proj", layer, rms_norm(x[query_index], norm))
                keys = pub.projector("key_proj", layer, rms_norm(cand[layer], norm))
                if f"ltm.{layer}" in pub.raw:  # rows shipped in the file keep the keys the file ships with them
                    same = (cand[layer][:, None] == pub.raw[f"ltm.{layer}"][None]).all(-1)  # [n, shipped]
                    hit = same.any(1)
                    keys[hit] = pub.raw[f"ltm_keys.{layer}"][same[hit].float().argmax(1)]
                scores = torch.sigmoid(q @ keys.T).mean(0)
                top = scores.topk(min(budget, cand.shape[1])).indices.sort().values
                assert ages is not None
                order = sorted(top.tolist(), key=lambda i: (-int(ages[layer, i]), i))
                chosen[layer] = cand[layer, order]
        return torch.cat([bos[layer], chosen[layer], pool[layer]])

    return prefix_of


def check_generation(pub: Published, llm: MPlusLLM, state: MemoryState, steps: int = 4) -> None:
    gen = pub.merged_model(pub.generation_adapter)
    prompt = ids_of(9, 7)
    query_index = torch.arange(2, 8)
    prefix_of = frozen_prefix(pub, gen, state, query_index)
    ids, want_tokens = list(prompt), []
    with torch.no_grad():
        first = reference_logits(gen, prefix_of, ids)
        logits = first
        for _ in range(steps):
            token = int(logits.argmax())
            if token == 2:  # EOS ends the reply and is not part of it
                break
            want_tokens.append(token)
            ids.append(token)
            logits = reference_logits(gen, prefix_of, ids)
    with torch.no_grad():
        got, _, _, info = llm.engine.read(state, llm.sink(state.config), torch.tensor(prompt), query_index)
    assert rel_err(got, first) < TOL
    assert info.retrieved_tokens == min(state.config.retrieve_tokens, state.long_term_size())
    mem = llm.new_memory()
    mem.replace_state(state)
    g = llm.start(Prompt(torch.tensor(prompt), query_index), mem, SamplingConfig(max_new_tokens=steps))
    "".join(g.pieces)
    assert g.result.token_ids == want_tokens


# ---------------------------------------------------------------------------------------------- published layouts


def test_mplus_style_loads_and_equals_reference(mplus: Published) -> None:
    llm = load(mplus.path)
    cfg = llm.config
    assert (cfg.source, cfg.pool_size, cfg.retrieve_tokens, cfg.tokens_per_chunk) == ("output", 16, 8, K)
    assert (cfg.scorer, cfg.selection, cfg.ltm_merge_every, cfg.ltm_decay) == ("retriever", "per_layer", 3, 1.0)
    assert llm.model.config.rope_parameters["rope_type"] == "llama3"
    assert llm.checkpoint is not None and llm.checkpoint.published

    state = llm.new_memory().state  # starts from the shipped memory
    gen = mplus.merged_model(mplus.generation_adapter)
    assert state.ltm.score_key is not None and state.ltm.rf is not None
    for layer in range(mplus.layers):
        with torch.no_grad():
            k, v = reference_kv(gen, layer, mplus.raw["memory"][layer])
            lk, _ = reference_kv(gen, layer, mplus.raw[f"ltm.{layer}"])
        assert rel_err(state.pool.k[layer], k) < TOL and rel_err(state.pool.v[layer], v) < TOL
        assert rel_err(state.ltm.k[layer], lk) < TOL
        assert torch.equal(state.ltm.age[layer], mplus.raw[f"ltm_ages.{layer}"].to(torch.int64))
        assert torch.equal(state.ltm.rf[layer], mplus.raw[f"ltm_recall_frequencies.{layer}"])
        assert torch.equal(state.ltm.score_key[layer], mplus.raw[f"ltm_keys.{layer}"])
    assert torch.equal(state.pool.age, torch.zeros_like(state.pool.age))  # SPEC 4.2: STM ages start at 0

    check_generation(mplus, llm, state)  # reading the shipped memory as it is
    # C >= K, C < K, then enough chunks to drop into staging and merge (every 3 injections).
    state = check_injections(mplus, llm, state, [20, 3, 9, 4, 17, 6, 11])
    assert len(state.staging) > 0 and len(state.ltm) > 12
    check_generation(mplus, llm, state)


def test_memoryllm_style_keeps_no_long_term_memory(memoryllm: Published) -> None:
    llm = load(memoryllm.path)
    cfg = llm.config
    assert (cfg.pool_size, cfg.retrieve_tokens, cfg.scorer) == (20, 0, "sigmoid_mean")
    assert llm.engine.weights.retriever is None and cfg.ltm_max_tokens == 0
    rotary = llm.model.model.rotary_emb
    plain = 1.0 / (500000.0 ** (torch.arange(0, 8, 2, dtype=torch.float) / 8))
    torch.testing.assert_close(rotary.inv_freq, plain / 1.8125)  # linear scaling, from the model's own module
    assert llm.max_positions() == int(1024 * 1.8125)
    state = check_injections(memoryllm, llm, llm.new_memory().state, [18, 2, 8, 30, 5, 12])
    assert len(state.pool) == 20 and state.long_term_size() == 0  # dropped tokens are discarded
    check_generation(memoryllm, llm, state)
    # Through the public API as well: text in, chunks dropped, nothing kept long-term.
    mem = llm.new_memory()
    mem.inject(" ".join(TEXTS))
    assert mem.stats().long_term_tokens == 0 and mem.stats().injections > 0


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path: Path, mplus: Published) -> None:
    sharded = write_published(tmp_path / "sharded", "mplus", sharded=True)
    assert (sharded.path / "model.safetensors.index.json").is_file()
    a, b = load(mplus.path), load(sharded.path)
    prompt = torch.tensor(ids_of(7, 3))
    outs = []
    for llm in (a, b):
        state = llm.new_memory().state
        with torch.no_grad():
            outs.append(llm.engine.read(state, llm.sink(state.config), prompt, torch.arange(7))[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)  # equal up to fp32 rounding


def test_new_memories_and_reset_start_from_the_shipped_memory(mplus: Published) -> None:
    llm = load(mplus.path)
    mem = llm.memory("alice")
    shipped = mem.state
    assert len(shipped.pool) == 16 and len(shipped.ltm) == 12
    mem.inject(" ".join(TEXTS))
    assert mem.state.injections > 0
    mem.reset()
    assert torch.equal(mem.state.pool.hidden, shipped.pool.hidden)  # type: ignore[arg-type]
    assert len(mem.state.ltm) == 12 and mem.state.injections == 0
    assert llm.memory("bob").state is shipped  # built once per config, shared (every update copies)


def test_ages_and_counters_never_pass_through_bf16(mplus: Published) -> None:
    llm = load(mplus.path, dtype=torch.bfloat16)
    assert llm.engine.arch.dtype == torch.bfloat16
    state = llm.new_memory().state
    assert state.pool.k.dtype == torch.bfloat16
    assert state.ltm.age.dtype == torch.int64 and state.ltm.rf is not None and state.ltm.rf.dtype == torch.float32
    for layer in range(mplus.layers):
        ages = mplus.raw[f"ltm_ages.{layer}"].to(torch.int64)
        assert not torch.equal(ages.to(torch.bfloat16).to(torch.int64), ages)  # bf16 would round them
        assert torch.equal(state.ltm.age[layer], ages)
        assert torch.equal(state.ltm.rf[layer], mplus.raw[f"ltm_recall_frequencies.{layer}"])
    # The release rounds the rotary buffer to bf16 with the whole model (SPEC 2.4); we replicate it.
    inv = llm.model.model.rotary_emb.inv_freq
    assert inv.dtype == torch.bfloat16
    assert isinstance(llm.chat("where?", memory=llm.new_memory(), max_new_tokens=3), str)


# ---------------------------------------------------------------------------------------------- round trips


def test_round_trip_with_memory_gives_identical_logits(tmp_path: Path, mplus: Published) -> None:
    llm = load(mplus.path)
    state = llm.new_memory().state
    for i, n in enumerate([20, 9, 17, 6]):
        state = inject(llm, state, ids_of(n, 50 + i))
    assert len(state.staging) > 0  # staged rows ship as long-term rows
    mem = llm.new_memory()
    mem.replace_state(state)
    out = save_checkpoint(tmp_path / "rt", llm, memory=mem, save_tokenizer=False, max_shard_bytes=4000)
    assert (out / "model.safetensors.index.json").is_file()
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.1.mlp.down_proj.base_layer.weight" in names
    assert "model.layers.0.self_attn.k_proj.lora_B.decoder_adapter.weight" in names
    assert "model.layers.1.self_attn.encoder_query_proj.2.weight" in names and "ltm_ages.1" in names

    back = load(out)
    assert back.config == llm.config and back.checkpoint is not None and not back.checkpoint.published
    loaded = back.new_memory().state
    assert loaded.long_term_size() == state.long_term_size() and len(loaded.staging) == 0
    torch.testing.assert_close(loaded.ltm.age, torch.cat([state.ltm.age, state.staging.age], 1), rtol=0, atol=0)
    prompt, qi = torch.tensor(ids_of(10, 9)), torch.arange(1, 9)
    with torch.no_grad():
        want = llm.engine.read(state, llm.sink(state.config), prompt, qi)[0]
        got = back.engine.read(loaded, back.sink(loaded.config), prompt, qi)[0]
    # K/V are recomputed from the memory vectors in other batch shapes, so equal up to fp32 rounding.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    chunk = ids_of(19, 77)
    a, b = inject(llm, state, chunk), inject(back, loaded, chunk)
    torch.testing.assert_close(a.pool.hidden[:, -K:], b.pool.hidden[:, -K:], rtol=1e-5, atol=1e-6)  # type: ignore[index]


def test_round_trip_of_a_plain_backbone_with_a_trained_retriever(tmp_path: Path) -> None:
    """The `mplus train` case: any base model, `input` source, a retriever over kv features."""
    cfg = MemoryConfig(pool_size=48, chunk_size=40, min_chunk=8, retrieve_tokens=16, block_size=4, scorer="retriever")
    llm = _retriever_llm("input", cfg)
    out = save_checkpoint(tmp_path / "plain", llm, save_tokenizer=False)
    data = json.loads((out / "config.json").read_text())
    assert data["mplus_agents"]["source"] == "input" and data["mplus_agents"]["key_input"] == "kv"
    assert "lm_head.weight" in load_file(str(out / "model.safetensors"))  # tiny_llama does not tie
    back = load(out)
    assert back.config == cfg and back.engine.weights.retriever is not None
    assert back.engine.weights.retriever.key_input == "kv" and back.engine.weights.adapters is None
    results = []
    for m in (llm, back):
        mem = m.new_memory()
        for text in TEXTS:
            mem.inject(text)
        g = m.start(m.raw_prompt("where is the gold"), mem, SamplingConfig(max_new_tokens=6))
        "".join(g.pieces)
        results.append((g.result.token_ids, g.read.retrieved_blocks))
    assert results[0] == results[1]


def test_round_trip_of_tied_embeddings_and_a_real_tokenizer(tmp_path: Path, smol_tokenizer: Any) -> None:
    model = tiny_llama(vocab_size=smol_tokenizer.vocab_size + 100, tie_word_embeddings=True)
    llm = MPlusLLM(model, smol_tokenizer, MemoryConfig(pool_size=64, chunk_size=32, min_chunk=8, retrieve_tokens=16))
    out = save_checkpoint(tmp_path / "tied", llm)
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    back = MPlusLLM.from_pretrained(out)  # tokenizer from the directory
    assert back.model.lm_head.weight is back.model.model.embed_tokens.weight
    ids = torch.tensor(llm.encode("hello memory"))
    with torch.no_grad():
        assert torch.equal(llm.model(ids[None]).logits, back.model(ids[None]).logits)


# ---------------------------------------------------------------------------------------------- LoRA


def test_lora_hook_equals_merged_weights_and_switches_per_thread() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5, bias=False)
    model = torch.nn.Sequential(lin)
    lora = LoRA(2, 4.0)
    a_up, b_up, a_gen, b_gen = torch.randn(2, 6), torch.randn(5, 2), torch.randn(2, 6), torch.randn(5, 2)
    lora.add("default", "0", a_up, b_up)
    lora.add("decoder_adapter", "0", a_gen, b_gen)
    lora.attach(model)
    x = torch.randn(3, 6)
    merged_gen = x @ (lin.weight + 2.0 * b_gen @ a_gen).T
    merged_up = x @ (lin.weight + 2.0 * b_up @ a_up).T
    with torch.no_grad():
        torch.testing.assert_close(model(x), merged_gen)  # generation adapter outside any switch
        seen: list[torch.Tensor] = []
        started, switched = threading.Event(), threading.Event()

        def other() -> None:
            started.set()
            switched.wait(5)
            with torch.no_grad():
                seen.append(model(x))

        t = threading.Thread(target=other)
        t.start()
        started.wait(5)
        with lora.use("default"):
            switched.set()
            t.join(5)
            torch.testing.assert_close(model(x), merged_up)
        torch.testing.assert_close(seen[0], merged_gen)  # the other thread kept its adapter
        with lora.use(None):
            torch.testing.assert_close(model(x), lin(x))
    with pytest.raises(KeyError, match="no LoRA adapter"), lora.use("nope"):
        pass


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def broken(tmp_path: Path, mplus: Published) -> Published:
    """A private copy of the mplus-style checkpoint to damage."""
    dst = tmp_path / "broken"
    shutil.copytree(mplus.path, dst)
    return Published(dst, json.loads(json.dumps(mplus.config)), dict(mplus.raw), mplus.r, mplus.alpha)


def expect(pub: Published, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as err:
        load(pub.path)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        load(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "file")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert not is_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_tokens": 4, "num_blocks": 5}))
    assert is_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor"):
        load_checkpoint(tmp_path)
    # A plain HF directory is not a checkpoint and keeps the ordinary path.
    tiny_llama().save_pretrained(tmp_path / "hf")
    assert not is_checkpoint(tmp_path / "hf")
    assert MPlusLLM.from_pretrained(tmp_path / "hf", tokenizer=CharTokenizer()).checkpoint is None


def test_missing_and_unexpected_weights_are_listed(broken: Published) -> None:
    raw = dict(broken.raw)
    del raw["model.norm.weight"], raw["ltm_ages.1"], raw["model.layers.0.mlp.up_proj.lora_B.default.weight"]
    del raw["model.layers.1.self_attn.key_proj.2.weight"]
    raw["model.layers.0.self_attn.rotary.weight"] = torch.zeros(2)
    raw["model.layers.0.mlp.up_proj.lora_A.other.weight"] = torch.zeros(broken.r, 32)
    rewrite(broken, raw)
    expect(
        broken,
        "missing weights",
        "model.norm.weight",
        "ltm_ages.1",
        "model.layers.0.mlp.up_proj.lora_B.default.weight",
        "model.layers.1.self_attn.key_proj.2.weight",
        "unexpected weights",
        "model.layers.0.self_attn.rotary.weight",
        "lora_A.other.weight",
    )


def test_shape_mismatches_are_listed(broken: Published) -> None:
    raw = dict(broken.raw)
    raw["memory"] = torch.zeros(2, 16, 31)
    raw["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(32, 30)
    raw["ltm_recall_frequencies.0"] = torch.zeros(11)
    rewrite(broken, raw)
    expect(
        broken,
        "shape mismatches",
        "memory (2, 16, 31)",
        "o_proj.weight (32, 30), expected (32, 32)",
        "ltm_recall_frequencies.0 has 11 rows",
    )


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"add_bos_embedding": False}, "add_bos_embedding=False but the checkpoint has bos_embedding"),
        ({"num_blocks": 7}, "memory holds 16 tokens per layer but the config's pool is 20"),
        ({"selector_hidden_dim": 16}, "selector_hidden_dim=16 but the projectors are 8 wide"),
        ({"add_encoder_retriever": False}, "add_encoder_retriever=False"),
        ({"lora_config": {"r": 8, "lora_alpha": 16}}, "expected (8, 32) (lora_config r=8)"),
        ({"lora_config": None}, "lora_config has no rank"),
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not a supported backbone"),
        ({"num_blocks": 2}, "leave no short-term memory"),
        ({"mplus_agents": {"format": 2}}, "this version reads format 1"),
    ],
)
def test_config_contradicting_the_weights(broken: Published, change: dict[str, Any], fragment: str) -> None:
    cfg = dict(broken.config)
    cfg.update(change)
    rewrite(broken, config=cfg)
    expect(broken, fragment)


def test_bad_shard_index_and_missing_tokenizer(tmp_path: Path) -> None:
    pub = write_published(tmp_path / "s", "memoryllm", sharded=True)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_checkpoint(pub.path)  # no tokenizer files and none passed
    (pub.path / "model-00002-of-00003.safetensors").unlink()
    expect(pub, "lists shard files that are not in", "model-00002-of-00003.safetensors")


def test_writer_refuses_what_the_layout_cannot_hold(tmp_path: Path, mplus: Published) -> None:
    cfg = MemoryConfig(pool_size=48, chunk_size=40, min_chunk=8, retrieve_tokens=16, block_size=4)
    llm = _retriever_llm("input", cfg)
    with pytest.raises(InvalidInputError, match="only an `output`-source memory"):
        save_checkpoint(tmp_path / "a", llm, memory=llm.new_memory(), save_tokenizer=False)
    with pytest.raises(InvalidInputError, match="save_pretrained"):
        save_checkpoint(tmp_path / "b", llm)
    assert not (tmp_path / "b").exists() and not any(p.name.startswith(".b.") for p in tmp_path.iterdir())
    save_checkpoint(tmp_path / "c", llm, save_tokenizer=False)
    with pytest.raises(CheckpointError, match="not empty"):
        save_checkpoint(tmp_path / "c", llm, save_tokenizer=False)
    save_checkpoint(tmp_path / "c", llm, save_tokenizer=False, overwrite=True)
    assert is_checkpoint(tmp_path / "c")


def test_fresh_lora_starts_as_the_base_model_trains_and_round_trips(tmp_path: Path) -> None:
    model = tiny_llama()
    ids = torch.tensor([[5, 9, 11, 4, 30]])
    with torch.no_grad():
        base = model(ids).logits
    lora = LoRA.create(model, r=2, alpha=4.0)
    assert len(lora.targets) == 3 * 6 and lora.adapters == ["default", "decoder_adapter"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base)  # B = 0: unchanged until trained
    model(ids).logits.sum().backward()
    b = lora.weights("decoder_adapter", "model.layers.0.self_attn.q_proj")
    assert b is not None and b[1].grad is not None and float(b[1].grad.abs().sum()) > 0
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cfg = MemoryConfig.mplus(pool_size=16, tokens_per_chunk=K, retrieve_tokens=8, chunk_size=24, min_chunk=3)
    from mplus_agents.engine import MPlusWeights

    llm = MPlusLLM(model, CharTokenizer(), cfg, weights=MPlusWeights(adapters=lora))
    out = save_checkpoint(tmp_path / "lora", llm, save_tokenizer=False)
    back = load(out)
    assert back.engine.weights.adapters is not None and back.engine.weights.adapters.scale == 2.0
    states = []
    for m in (llm, back):
        state = m.empty_state(cfg)
        for i, n in enumerate([20, 7, 18]):
            state = inject(m, state, ids_of(n, 60 + i))
        states.append(state)
    torch.testing.assert_close(states[0].pool.hidden, states[1].pool.hidden, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


def test_single_adapter_checkpoint_generates_with_it_and_config_can_be_overridden(tmp_path: Path) -> None:
    """add_decoder_lora=false: the one `default` adapter serves injection and generation alike."""
    pub = write_published(tmp_path / "one", "memoryllm", adapters=("default",), seed=3)
    assert pub.generation_adapter == "default"
    llm = load(pub.path)
    assert llm.engine.weights.adapters is not None and llm.engine.weights.adapters.adapters == ["default"]
    state = check_injections(pub, llm, llm.new_memory().state, [18, 3, 9])
    check_generation(pub, llm, state)
    wider = llm.config.replace(pool_size=32)
    other = load(pub.path, config=wider)
    assert other.config == wider and len(other.new_memory().state.pool) == 20  # the shipped 20 rows, room for 32
    with pytest.raises(InvalidInputError, match="more than pool_size=12"):
        load(pub.path, config=llm.config.replace(pool_size=12)).new_memory()


def test_missing_ltm_keys_are_computed_by_the_key_projector(broken: Published) -> None:
    """SPEC 4.5: `ltm_keys` absent -> f_k(RMSNorm_l(ltm)), as the release computes them lazily."""
    raw = {k: v for k, v in broken.raw.items() if not k.startswith("ltm_keys.")}
    rewrite(broken, raw)
    llm = load(broken.path)
    state = llm.new_memory().state
    assert state.ltm.score_key is not None
    for layer in range(broken.layers):
        norm = llm.model.model.layers[layer].input_layernorm
        with torch.no_grad():
            want = broken.projector("key_proj", layer, rms_norm(broken.raw[f"ltm.{layer}"], norm))
        assert rel_err(state.ltm.score_key[layer], want) < TOL
