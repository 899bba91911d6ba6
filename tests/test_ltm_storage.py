"""Long-term storage (issue 7 item 2): int8 quantisation, scoring without a full-precision copy, memory-mapped
loads that stay on disk and keep growing in spill files, persistence of int8 stores, and damaged files."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mplus_agents import MemoryConfig, MPlusLLM, quant
from mplus_agents.engine import Candidates
from mplus_agents.filemap import (
    MappedFileError,
    Spill,
    SpillError,
    file_backing,
    map_safetensors,
    tensor_chunks,
    write_safetensors,
)
from mplus_agents.memory import LatentMemory
from mplus_agents.retrieval import QUANT_CHUNK, head_mean_logits, select_tokens, token_scores
from mplus_agents.state import TokenStore
from mplus_agents.statefile import MemoryFileError, load_memory, save_memory
from mplus_agents.store.store import MemoryStore
from tests.conftest import CharTokenizer, tiny_llama, tiny_qwen3
from tests.test_store_support import TEXTS, read_logits, same_state

SMALL = MemoryConfig(pool_size=96, chunk_size=48, injection_context=48, retrieve_tokens=32, block_size=16)
SMALL_OUTPUT = MemoryConfig.mplus(
    pool_size=64, tokens_per_chunk=8, chunk_size=40, retrieve_tokens=16, ltm_merge_every=2
)
QUESTION = "what is the locker code?"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def filled(llm: MPlusLLM, texts: list[str] = TEXTS * 2) -> LatentMemory:
    mem = llm.new_memory()
    for i, t in enumerate(texts):
        mem.inject(t, role="user" if i % 2 == 0 else "assistant")
    return mem


def rss_anon() -> int:
    """Anonymous resident bytes: what cannot be paged back to a file (file-backed pages are evictable).

    Freed heap pages are handed back first (`malloc_trim`): glibc keeps freed scoring temporaries resident,
    which says nothing about whether the store was copied.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")
    return 0


# ---------------------------------------------------------------------------------------------- quantisation


def test_quantize_error_is_within_half_a_step_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 500, 4, 32, generator=g) * torch.logspace(-3, 2, 500).view(1, -1, 1, 1)
    x[0, 7] = 0.0  # an all-zero row
    q, scale = quant.quantize(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 500, 4) and scale.dtype == torch.float32
    back = quant.dequantize(q, scale)
    amax = x.abs().amax(dim=-1, keepdim=True)
    assert bool(((back - x).abs() <= amax / 254 * (1 + 1e-5) + 1e-12).all())
    assert torch.equal(back[0, 7], torch.zeros(4, 32))
    assert int(q.abs().max()) == 127  # the range is used to the end: each row's largest entry maps to +-127
    # bf16 stores half the bytes with a relative error of 2^-8; int8 is bounded per row instead.
    assert quant.dequantize(q, scale, torch.bfloat16).dtype == torch.bfloat16


def test_token_store_to_int8_and_back() -> None:
    g = torch.Generator().manual_seed(1)
    store = TokenStore(
        k=torch.randn(2, 40, 2, 8, generator=g), v=torch.randn(2, 40, 2, 8, generator=g),
        age=torch.arange(40).expand(2, 40).clone(), block=torch.arange(40).expand(2, 40).clone(),
        hidden=torch.randn(2, 40, 12, generator=g), rf=torch.ones(2, 40),
    )
    q = store.to(dtype=torch.int8)
    assert q.quantized and q.k_scale is not None and q.hidden_scale is not None and q.hidden_scale.shape == (2, 40)
    assert torch.equal(q.age, store.age) and torch.equal(q.rf, store.rf)  # bookkeeping is never quantised
    back = q.to(dtype=torch.float32)
    assert not back.quantized and back.k_scale is None and set(back.tensors()) == set(store.tensors())
    for name in ("k", "v", "hidden"):
        err = (getattr(back, name) - getattr(store, name)).abs().max()
        assert float(err) <= float(getattr(store, name).abs().max()) / 254 * 1.0001
    idx = torch.tensor([5, 0, 39])
    assert torch.equal(q.rows("k", 1, idx), quant.dequantize(q.k[1, idx], q.k_scale[1, idx]))
    # Gathers and appends keep each scale with its row.
    per_layer = torch.tensor([[3, 4], [9, 1]])
    taken = q.take(per_layer)
    assert torch.equal(taken.k_scale[1], q.k_scale[1, [9, 1]]) and torch.equal(taken.k[1], q.k[1, [9, 1]])
    grown = q.append(q.take(torch.arange(5)))
    assert torch.equal(grown.k_scale, torch.cat([q.k_scale, q.k_scale[:, :5]], dim=1))


# ---------------------------------------------------------------------------------------------- scoring


def random_qk(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(7, 6, 32, generator=g)
    k = torch.randn(n, 2, 32, generator=g) * torch.rand(n, 2, 1, generator=g) * 3
    # A few planted matches, as a real fact block would be among unrelated chat.
    k[::997] = q.reshape(7, 2, 3, 32).mean(dim=2)[0] * 2 + 0.1 * torch.randn(k[::997].shape, generator=g)
    return q, k


@pytest.mark.parametrize("scorer", ["sigmoid_mean", "max_logit", "max_z"])
def test_int8_scores_follow_the_float32_reference(scorer: str) -> None:
    n = 2 * QUANT_CHUNK + 123  # several dequantised chunks and a ragged tail
    q, k = random_qk(n, 2)
    k8, scale = quant.quantize(k)
    ref = token_scores(q, k, scorer)
    got = token_scores(q, k8, scorer, scale)
    # Exactly the reference computed on the dequantised keys: the chunking loses nothing.
    assert torch.allclose(got, token_scores(q, quant.dequantize(k8, scale), scorer), rtol=1e-5, atol=1e-5)
    # Against the unquantised keys: close, and the same best candidates.
    spread = float(ref.max() - ref.min())
    assert float((got - ref).abs().max()) < 0.02 * spread
    top = 256
    overlap = len(set(ref.topk(top).indices.tolist()) & set(got.topk(top).indices.tolist()))
    assert overlap >= 0.9 * top
    assert set(ref.topk(8).indices.tolist()) == set(got.topk(8).indices.tolist())


def test_head_mean_logits_int8_matches_dequantised_reference() -> None:
    q, k = random_qk(QUANT_CHUNK + 5, 3)
    k8, scale = quant.quantize(k)
    got = head_mean_logits(q, k8, scale)
    assert got.shape == (7, QUANT_CHUNK + 5) and got.dtype == torch.float32
    assert torch.allclose(got, head_mean_logits(q, quant.dequantize(k8, scale)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keys_are_scored_in_their_own_dtype(dtype: torch.dtype) -> None:
    """bf16/fp16 stores are multiplied in their dtype (the query is cast down, not the store up)."""
    q, k = random_qk(3000, 4)
    kh = k.to(dtype)
    for scorer in ("sigmoid_mean", "max_logit", "max_z"):
        got = token_scores(q, kh, scorer)
        ref = token_scores(q, k, scorer)
        assert got.dtype == torch.float32
        assert float((got - ref).abs().max()) < 0.02 * float(ref.max() - ref.min())
        assert set(ref.topk(8).indices.tolist()) == set(got.topk(8).indices.tolist())


# ---------------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize(("make", "config"), [(tiny_llama, SMALL), (tiny_qwen3, SMALL_OUTPUT)])
def test_int8_memory_reads_close_to_float32(make, config) -> None:
    mems = {}
    # Every long-term token is read, so the comparison measures int8's numeric error, not a top-k flip
    # between near-tied candidates (single-token retrieval with sigmoid_mean has many near ties).
    for dtype in (None, "int8"):
        llm = MPlusLLM(make(), CharTokenizer(), config.replace(ltm_dtype=dtype, retrieve_tokens=4096))
        mems[dtype] = (llm, filled(llm))
    llm8, mem8 = mems["int8"]
    assert mem8.state.ltm.k.dtype == torch.int8 and len(mem8.state.ltm) > 0
    assert mem8.state.ltm.k_scale is not None and mem8.state.ltm.k_scale.shape[:2] == mem8.state.ltm.k.shape[:2]
    llm32, mem32 = mems[None]
    # Same pool (never quantised), a long-term store within int8 error of the float32 one.
    assert torch.equal(mem8.state.pool.k, mem32.state.pool.k)
    ltm32 = mem32.state.ltm
    back = mem8.state.ltm.to(dtype=torch.float32)
    assert float((back.k - ltm32.k).abs().max()) <= float(ltm32.k.abs().max()) / 254 * 1.001
    a, b = read_logits(llm8, mem8, QUESTION), read_logits(llm32, mem32, QUESTION)
    assert float((a - b).abs().max()) < 0.05 * float(b.abs().max())
    st8, st32 = mem8.stats(), mem32.stats()
    assert st8.long_term_tokens == st32.long_term_tokens and st8.bytes < st32.bytes


@pytest.mark.parametrize("kind", ["exact", "torch", "faiss", "scan"])
@pytest.mark.parametrize("scorer", ["max_z", "max_logit"])
def test_per_layer_selection_reads_int8_keys_through_their_scales(kind: str, scorer: str) -> None:
    """Every index scores the dequantised keys (it once fed raw int8 values to the product: all-zero scores)."""
    if kind == "faiss":
        pytest.importorskip("faiss")
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), SMALL.replace(ltm_dtype="int8", selection="per_layer"))
    mem = filled(llm)
    cand = Candidates(mem.state)
    cand.index_kind = kind
    shapes = llm.engine.arch.shapes
    q = torch.randn(5, shapes.heads, shapes.head_dim, generator=torch.Generator().manual_seed(1))
    for layer in range(shapes.layers):
        reference = cand.scores(layer, q, scorer)  # max_z_scores / token_scores with the scales
        want = select_tokens(reference, cand.field("block", layer), cand.field("age", layer), 32, exact=True)
        assert torch.equal(cand.select(layer, q, scorer, 32), want), (kind, layer)


# ---------------------------------------------------------------------------------------------- mmap


def with_big_ltm(llm: MPlusLLM, n: int) -> LatentMemory:
    """A real memory whose long-term store is padded in front with `n` random older tokens (fast to build)."""
    mem = filled(llm)
    st = mem.state
    layers, _, kvh, hd = st.ltm.k.shape
    g = torch.Generator().manual_seed(5)
    older = TokenStore(
        k=torch.randn(layers, n, kvh, hd, generator=g),
        v=torch.randn(layers, n, kvh, hd, generator=g),
        age=(torch.arange(n, 0, -1) + int(st.ltm.age.max()) + 1).expand(layers, n).clone(),
        block=(torch.arange(n) // st.config.block_size - n).expand(layers, n).clone(),
        rf=torch.full((layers, n), st.config.ltm_initial_rf),
        word=torch.zeros(layers, n, dtype=torch.int64) if st.ltm.word is not None else None,
    ).to(dtype=st.ltm.k.dtype)
    mem.replace_state(dataclasses.replace(st, ltm=older.cat(st.ltm)))
    return mem


@pytest.mark.parametrize("ltm_dtype", [None, "int8"])
def test_mmap_load_stays_on_disk_reads_identically_and_grows_in_spill_files(tmp_path: Path, ltm_dtype) -> None:
    # SmolLM2's key width (3 KV heads x 64) so the store, not the [query tokens, n] score temporaries, dominates.
    model = tiny_llama(hidden_size=192, num_attention_heads=3, num_key_value_heads=3)
    llm = MPlusLLM(model, CharTokenizer(), SMALL.replace(ltm_dtype=ltm_dtype))
    ram = with_big_ltm(llm, 16_000 if ltm_dtype is None else 60_000)
    path = save_memory(ram, tmp_path / "big.mplus")
    saved_tail = ram.state.ltm.k[:, -5:].clone()
    size = path.stat().st_size
    assert size > 40 * 2**20
    spill = tmp_path / "spill"
    gc.collect()
    before = rss_anon()
    mapped = load_memory(llm, path, mmap=True, spill_dir=spill)
    loaded = rss_anon() - before
    assert loaded < size / 8, f"an mmap load put {loaded} anonymous bytes in RAM for a {size}-byte file"
    for t in (mapped.state.ltm.k, mapped.state.ltm.v):
        assert file_backing(t) == str(path.resolve())

    # Reads: bit-identical to the memory that never left RAM, and still no copy of the store.
    assert torch.equal(read_logits(llm, mapped, QUESTION), read_logits(llm, ram, QUESTION))
    assert llm.chat(QUESTION, memory=mapped, max_new_tokens=6) == llm.chat(QUESTION, memory=ram, max_new_tokens=6)
    assert rss_anon() - before < size / 4

    # New merges append into unlinked spill files, not RAM and not the loaded file.
    mapped.inject("my favourite colour is teal " * 4, role="user")
    grew = rss_anon() - before
    assert grew < size / 4, f"the first merge after an mmap load moved {grew} bytes into anonymous RAM"
    backing = file_backing(mapped.state.ltm.k)
    assert backing is not None and backing.startswith(str(spill.resolve())) and backing.endswith("(deleted)")
    assert not list(spill.iterdir()), "spill files are unlinked once mapped"
    ram.inject("my favourite colour is teal " * 4, role="user")
    assert same_state(mapped, ram)
    assert torch.equal(read_logits(llm, mapped, QUESTION), read_logits(llm, ram, QUESTION))
    # Saving the grown store writes it layer by layer from the spill buffers; both loaders read it back.
    out = save_memory(mapped, tmp_path / "grown.mplus")
    assert same_state(load_memory(llm, out), ram) and same_state(load_memory(llm, out, mmap=True), ram)
    # The file on disk is untouched by all of this (copy-on-write mapping): it still holds the saved memory.
    again = load_memory(llm, path)
    assert again.state.tokens_injected < ram.state.tokens_injected
    assert torch.equal(again.state.ltm.k[:, -5:], saved_tail)


def test_mmap_store_evicts_into_spill_files(tmp_path: Path) -> None:
    """M+ settings evict on merges (decay, cap): the gathered survivors go to spill buffers as well."""
    config = SMALL_OUTPUT.replace(ltm_max_tokens=40, ltm_dtype="int8")
    llm = MPlusLLM(tiny_qwen3(), CharTokenizer(), config)
    ram = filled(llm)
    path = save_memory(ram, tmp_path / "m.mplus")
    mapped = load_memory(llm, path, mmap=True, spill_dir=tmp_path)
    for mem in (ram, mapped):
        mem.inject_many(TEXTS, roles=["user"] * len(TEXTS))
    assert len(mapped.state.ltm) == 40
    assert same_state(mapped, ram)
    backing = file_backing(mapped.state.ltm.k)
    assert backing is not None and backing.endswith("(deleted)")


def test_writing_a_spilled_view_copies_nothing(tmp_path: Path) -> None:
    """`tensor_chunks` (the statefile writer and checksum) reads a `[L, n]` view of `[L, capacity]` buffers in
    place, one layer at a time: every chunk lies inside the spill mapping."""
    buf = Spill(tmp_path).empty([3, 100, 2, 8], torch.float32)
    buf.copy_(torch.randn(3, 100, 2, 8))
    view = buf[:, :60]
    assert not view.is_contiguous()
    chunks = list(tensor_chunks(view))
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * 4
    for chunk in chunks:
        address = np.frombuffer(chunk, dtype=np.uint8).ctypes.data
        assert lo <= address < hi
    assert b"".join(bytes(c) for c in chunks) == view.contiguous().numpy().tobytes()
    with open(tmp_path / "v.safetensors", "wb") as f:
        write_safetensors(f, {"v": view, "n": torch.arange(3, dtype=torch.int8)}, {"a": "b"})
    with safe_open(str(tmp_path / "v.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("v"), view) and f.metadata() == {"a": "b"}


def test_an_unwritable_spill_directory_is_a_clear_error_and_leaves_the_memory_as_it_was(tmp_path: Path) -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), SMALL)
    path = save_memory(filled(llm), tmp_path / "m.mplus")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the spill directory should be")
    mapped = load_memory(llm, path, mmap=True, spill_dir=blocker / "spill")
    before = mapped.state
    with pytest.raises(SpillError, match="spill_dir"):
        mapped.inject("my favourite colour is teal " * 4, role="user")
    assert mapped.state is before


def test_spill_and_map_helpers(tmp_path: Path) -> None:
    t = Spill(tmp_path).empty([3, 5, 2], torch.float32)
    t[:] = 2.5
    assert float(t.sum()) == 75.0 and (file_backing(t) or "").endswith("(deleted)")
    assert Spill(tmp_path).empty([3, 0], torch.int8).shape == (3, 0)
    save_file({"a": torch.arange(10, dtype=torch.int8), "b": torch.ones(2, 3)}, tmp_path / "x.safetensors")
    _, tensors = map_safetensors(tmp_path / "x.safetensors")
    assert torch.equal(tensors["a"], torch.arange(10, dtype=torch.int8)) and torch.equal(tensors["b"], torch.ones(2, 3))
    assert file_backing(tensors["b"]) == str((tmp_path / "x.safetensors").resolve())
    assert file_backing(torch.ones(4)) is None


# ---------------------------------------------------------------------------------------------- persistence


@pytest.mark.parametrize(("make", "config"), [(tiny_llama, SMALL), (tiny_qwen3, SMALL_OUTPUT)])
@pytest.mark.parametrize("mmap", [False, True])
def test_int8_statefile_round_trip(tmp_path: Path, make, config, mmap: bool) -> None:
    llm = MPlusLLM(make(), CharTokenizer(), config.replace(ltm_dtype="int8"))
    mem = filled(llm)
    path = save_memory(mem, tmp_path / "m.mplus")
    with safe_open(str(path), framework="pt") as f:
        assert {"ltm.k_scale", "ltm.v_scale", "staging.k_scale"} <= set(f.keys())
    back = load_memory(llm, path, mmap=mmap)
    assert same_state(mem, back)
    assert torch.equal(read_logits(llm, back, QUESTION), read_logits(llm, mem, QUESTION))


@pytest.mark.parametrize("ltm_dtype", [None, "bfloat16"])
def test_files_without_scales_still_load_both_ways(tmp_path: Path, ltm_dtype) -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), SMALL.replace(ltm_dtype=ltm_dtype))
    mem = filled(llm)
    path = save_memory(mem, tmp_path / "m.mplus")
    rewrite(path, lambda m, t: None)  # as the previous `save_memory` wrote it: safetensors' own `save_file`
    with safe_open(str(path), framework="pt") as f:
        assert not any(k.endswith("_scale") for k in f.keys())  # noqa: SIM118
    assert same_state(load_memory(llm, path), mem) and same_state(load_memory(llm, path, mmap=True), mem)


def test_int8_store_round_trip(tmp_path: Path) -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), SMALL.replace(ltm_dtype="int8"))
    store = MemoryStore(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "shards")
    mem = llm.memory("alice", store)
    for i, t in enumerate(TEXTS * 2):
        mem.inject(t, role="user" if i % 2 == 0 else "assistant")
    mem.save()
    again = MemoryStore(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "shards").open(llm, "alice")
    assert again.state.ltm.k.dtype == torch.int8 and same_state(mem, again)
    assert torch.equal(read_logits(llm, again, QUESTION), read_logits(llm, mem, QUESTION))


# ---------------------------------------------------------------------------------------------- damage


def rewrite(path: Path, change) -> None:
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
    change(metadata, tensors)
    # Keep the checksum consistent so the structural checks, not the checksum, are what is tested.
    from mplus_agents.statefile import _tensors_sha256

    metadata["sha256"] = _tensors_sha256(tensors)
    save_file(tensors, path, metadata=metadata)


@pytest.fixture
def saved_int8(tmp_path: Path) -> tuple[MPlusLLM, Path]:
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), SMALL.replace(ltm_dtype="int8"))
    return llm, save_memory(filled(llm), tmp_path / "m.mplus")


@pytest.mark.parametrize("mmap", [False, True])
def test_missing_scales_are_a_clear_error(saved_int8, mmap: bool) -> None:
    llm, path = saved_int8
    rewrite(path, lambda m, t: t.pop("ltm.k_scale"))
    with pytest.raises(MemoryFileError, match="k_scale"):
        load_memory(llm, path, mmap=mmap)


@pytest.mark.parametrize("mmap", [False, True])
def test_scales_of_the_wrong_shape_are_a_clear_error(saved_int8, mmap: bool) -> None:
    llm, path = saved_int8
    rewrite(path, lambda m, t: t.update({"ltm.v_scale": t["ltm.v_scale"][:, :-1].contiguous()}))
    with pytest.raises(MemoryFileError, match="v_scale"):
        load_memory(llm, path, mmap=mmap)


def test_int8_file_read_with_a_float_config_is_refused(saved_int8) -> None:
    llm, path = saved_int8

    def to_float_config(m: dict[str, str], t: dict[str, torch.Tensor]) -> None:
        cfg = json.loads(m["memory_config"])
        cfg["ltm_dtype"] = None
        m["memory_config"] = json.dumps(cfg)

    rewrite(path, to_float_config)
    with pytest.raises(MemoryFileError, match="scale"):
        load_memory(llm, path)


@pytest.mark.parametrize("keep", [0, 7, 100, -1000, -1])
def test_truncated_file_is_a_clear_error_when_mapped(saved_int8, keep: int) -> None:
    llm, path = saved_int8
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[: len(data) + keep])
    with pytest.raises(MemoryFileError, match=str(path)):
        load_memory(llm, path, mmap=True)


def test_flipped_bytes_are_detected_when_mapped(saved_int8) -> None:
    llm, path = saved_int8
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(MemoryFileError, match="corrupted"):
        load_memory(llm, path, mmap=True)
    assert load_memory(llm, path, mmap=True, verify=False).state.tokens_injected > 0  # trusted on request


def test_unaligned_or_overlong_headers_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    header = json.dumps({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)  # 8 of the 16 data bytes
    with pytest.raises(MappedFileError, match="does not fit"):
        map_safetensors(bad)
    bad.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(MappedFileError, match="header size"):
        map_safetensors(bad)
    os.truncate(bad, 3)
    with pytest.raises(MappedFileError, match="shorter"):
        map_safetensors(bad)


def test_checkpoint_of_an_int8_memory_ships_dequantised_vectors(tmp_path: Path) -> None:
    from mplus_agents.checkpoints import save_checkpoint

    llm = MPlusLLM(tiny_qwen3(), CharTokenizer(), SMALL_OUTPUT.replace(ltm_dtype="int8"))
    mem = filled(llm)
    ltm = mem.state.ltm
    assert ltm.quantized and len(ltm) > 0
    out = save_checkpoint(tmp_path / "ck", llm, memory=mem, save_tokenizer=False)
    shipped: dict[str, torch.Tensor] = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            shipped.update({k: f.get_tensor(k) for k in f.keys() if k.startswith("ltm.")})  # noqa: SIM118
    assert ltm.hidden is not None and ltm.hidden_scale is not None
    want = quant.dequantize(ltm.hidden[0], ltm.hidden_scale[0])
    assert shipped["ltm.0"].is_floating_point()
    torch.testing.assert_close(shipped["ltm.0"][: len(ltm)].float(), want)
