"""One memory in one safetensors file: exact round trips, refusal of other models, damaged files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mplus_agents import MemoryConfig, MemoryMismatchError, MPlusError, MPlusLLM
from mplus_agents.memory import LatentMemory
from mplus_agents.statefile import MemoryFileError, load_memory, model_fingerprint, save_memory
from tests.conftest import CharTokenizer, tiny_llama, tiny_qwen3

SMALL_INPUT = MemoryConfig(pool_size=96, chunk_size=48, injection_context=48, retrieve_tokens=32, block_size=16)
SMALL_OUTPUT = MemoryConfig.mplus(
    pool_size=64, tokens_per_chunk=8, chunk_size=40, retrieve_tokens=16, ltm_merge_every=2
)


@pytest.fixture(autouse=True)
def one_thread():
    """While other processes share the 2 cores, torch's second OpenMP thread makes small forwards 5-1000x
    slower (it waits for a core); one thread keeps these tests fast. Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_logits(llm: MPlusLLM, mem: LatentMemory, question: str) -> torch.Tensor:
    """Next-token logits of a chat prompt read through `mem` (the first forward pass of generation)."""
    prompt = llm.chat_prompt([{"role": "user", "content": question}], mem.pending)
    with torch.no_grad():
        logits, _, _, _ = llm.engine.read(mem.state, llm.sink(mem.config), prompt.ids, prompt.query_index)
    return logits


def assert_same_memory(a: LatentMemory, b: LatentMemory) -> None:
    ta, tb = a.state.tensors(), b.state.tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), name
    assert a.pending == b.pending
    assert a.config == b.config
    assert a.stats() == b.stats()


def filled(llm: MPlusLLM, texts: list[str]) -> LatentMemory:
    mem = llm.new_memory()
    for text in texts:
        mem.inject(text, role="user")
    return mem


@pytest.mark.parametrize(("make", "config"), [(tiny_llama, SMALL_INPUT), (tiny_qwen3, SMALL_OUTPUT)])
def test_round_trip_tiny(tmp_path, make, config) -> None:
    llm = MPlusLLM(make(), CharTokenizer(), config)
    mem = filled(llm, ["the quick brown fox jumps over the lazy dog " * 3, "locker code 4812 " * 6] * 2)
    mem.inject("hi", role="user")  # `output` source: shorter than min_chunk, held back as pending
    stats = mem.stats()
    assert stats.long_term_tokens > 0, "the test should cover the long-term store too"
    if config.source == "output":
        assert mem.pending, "the test should cover pending tokens"
    path = save_memory(mem, tmp_path / "m.mplus")
    back = load_memory(llm, path)
    assert_same_memory(mem, back)
    assert torch.equal(read_logits(llm, mem, "what is the code"), read_logits(llm, back, "what is the code"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.mplus"], "no temporary file may be left behind"


def test_loaded_memory_keeps_working_like_the_original(tmp_path) -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), SMALL_INPUT)
    mem = filled(llm, ["alpha beta gamma delta " * 5])
    back = load_memory(llm, save_memory(mem, tmp_path / "m.mplus"))
    for m in (mem, back):
        m.inject("epsilon zeta eta theta iota " * 5, role="user")
    assert_same_memory(mem, back)


@pytest.mark.slow
def test_loaded_with_other_read_settings(tmp_path) -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), SMALL_INPUT)
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "locker code 4812 " * 6] * 2
    path = save_memory(filled(llm, texts), tmp_path / "m.mplus")
    reads = SMALL_INPUT.replace(retrieve_tokens=16, ltm_index="torch", selection="per_layer")
    back = load_memory(llm, path, read_config=reads)
    fresh = LatentMemory(llm, reads)
    for text in texts:
        fresh.inject(text, role="user")
    assert_same_memory(back, fresh)
    assert torch.equal(read_logits(llm, back, "what is the code"), read_logits(llm, fresh, "what is the code"))
    with pytest.raises(MemoryMismatchError, match="rebuild"):
        load_memory(llm, path, read_config=SMALL_INPUT.replace(chunk_size=40))


def test_round_trip_embedded_model(tmp_path, smol) -> None:
    config = MemoryConfig(pool_size=128, chunk_size=64, injection_context=64, retrieve_tokens=64, block_size=16)
    mem = smol.new_memory(config, user_id="ada")
    mem.inject_many(
        ["My name is Ada and my locker code is 4812.", "I moved to Lisbon in May; the weather is lovely there."] * 4,
        roles=["user", "user"] * 4,
    )
    assert mem.stats().long_term_tokens > 0
    mem.pending = [42, 43]  # the `input` source never holds tokens back; set some so their persistence is tested
    path = save_memory(mem, tmp_path / "ada.mplus")
    back = load_memory(smol, path)
    assert back.user_id == "ada"
    assert_same_memory(mem, back)
    assert torch.equal(
        read_logits(smol, mem, "What is my locker code?"), read_logits(smol, back, "What is my locker code?")
    )


def test_save_replaces_the_previous_file(tmp_path) -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), SMALL_INPUT)
    mem = filled(llm, ["one two three four five six seven eight nine ten"])
    path = save_memory(mem, tmp_path / "m.mplus")
    mem.inject("eleven twelve thirteen fourteen fifteen sixteen", role="user")
    save_memory(mem, path)
    assert load_memory(llm, path).stats() == mem.stats()


def test_a_memory_follows_the_models_dtype(tmp_path) -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), SMALL_INPUT)
    mem = filled(llm, ["one two three four five six seven eight nine ten " * 3])
    path = save_memory(mem, tmp_path / "m.mplus")
    bf16 = MPlusLLM(tiny_llama().to(torch.bfloat16), CharTokenizer(), SMALL_INPUT)
    back = load_memory(bf16, path)
    assert back.state.pool.k.dtype == torch.bfloat16
    assert torch.equal(back.state.pool.k, mem.state.pool.k.to(torch.bfloat16))


def test_fingerprint_ignores_where_the_model_was_loaded_from() -> None:
    a = MPlusLLM(tiny_llama(), CharTokenizer())
    b = MPlusLLM(tiny_llama(), CharTokenizer())
    b.model.config._name_or_path = "/somewhere/else"
    assert model_fingerprint(a) == model_fingerprint(b)


def test_another_architecture_is_refused(tmp_path) -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), SMALL_INPUT)
    path = save_memory(filled(llm, ["one two three four five six seven eight nine ten"]), tmp_path / "m.mplus")
    other = MPlusLLM(tiny_llama(num_hidden_layers=2), CharTokenizer(), SMALL_INPUT)
    with pytest.raises(MemoryMismatchError, match=r"layers: stored 3, now 2"):
        load_memory(other, path)


@pytest.mark.slow
def test_memory_of_the_embedded_model_is_refused_by_another_model(tmp_path, smol) -> None:
    mem = smol.new_memory()
    mem.inject("My locker code is 4812.", role="user")
    path = save_memory(mem, tmp_path / "smol.mplus")
    tiny = MPlusLLM(tiny_llama(), CharTokenizer())
    with pytest.raises(MemoryMismatchError) as info:
        load_memory(tiny, path)
    message = str(info.value)
    assert "SmolLM2-135M-Instruct" in message and str(path) in message
    assert "inject" in message, "the message should say how to rebuild the memory"


@pytest.fixture
def saved(tmp_path):
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), SMALL_INPUT)
    path = save_memory(filled(llm, ["one two three four five six seven eight nine ten " * 3]), tmp_path / "m.mplus")
    return llm, path


@pytest.mark.parametrize("keep", [0, 7, 100, -1000, -1])
def test_truncated_file_is_a_clear_error(saved, keep) -> None:
    llm, path = saved
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[: len(data) + keep])
    with pytest.raises(MemoryFileError, match=str(path)):
        load_memory(llm, path)


def test_flipped_bytes_are_detected(saved) -> None:
    llm, path = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data, where safetensors itself checks nothing
    path.write_bytes(bytes(data))
    with pytest.raises(MemoryFileError, match="corrupted"):
        load_memory(llm, path)


def test_other_safetensors_file_is_refused(tmp_path) -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer())
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2, 2)}, path)
    with pytest.raises(MemoryFileError, match="not an mplus_agents memory"):
        load_memory(llm, path)


def test_newer_format_is_refused_with_upgrade_hint(saved) -> None:
    from safetensors import safe_open

    llm, path = saved
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    metadata["format_version"] = "99"
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(MemoryFileError, match="upgrade mplus_agents"):
        load_memory(llm, path)


def test_missing_file(tmp_path) -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer())
    with pytest.raises(FileNotFoundError, match="no memory file"):
        load_memory(llm, tmp_path / "absent.mplus")


def test_metadata_is_plain_json_not_pickle(saved) -> None:
    from safetensors import safe_open

    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert MemoryConfig.from_json(metadata["memory_config"]) == SMALL_INPUT
    assert json.loads(metadata["model"])["layers"] == 3
    assert metadata["format"] == "mplus-memory"
    assert issubclass(MemoryFileError, MPlusError)


def test_fingerprint_covers_the_mplus_additions() -> None:
    """Same backbone, different retriever / BOS vectors: a memory of one must not be read by the other."""
    from mplus_agents.engine import MPlusWeights
    from mplus_agents.retriever import Retriever

    def llm_with(seed: int | None, bos_scale: float | None = None) -> MPlusLLM:
        weights = MPlusWeights()
        if seed is not None:
            torch.manual_seed(seed)
            weights.retriever = Retriever(3, 48, 32, dim=8, key_input="kv")
        if bos_scale is not None:
            weights.bos = torch.full((3, 1, 48), bos_scale)
        cfg = MemoryConfig(pool_size=32, chunk_size=16, min_chunk=8)
        return MPlusLLM(tiny_llama(), CharTokenizer(), cfg, weights=weights)

    plain = model_fingerprint(llm_with(None))
    assert plain == model_fingerprint(llm_with(None))
    assert plain["weights_sha256"] != model_fingerprint(llm_with(1))["weights_sha256"]
    assert model_fingerprint(llm_with(1))["weights_sha256"] != model_fingerprint(llm_with(2))["weights_sha256"]
    assert model_fingerprint(llm_with(None, 0.5))["weights_sha256"] != model_fingerprint(llm_with(None, 0.25))[
        "weights_sha256"
    ]
