"""Write an `MPlusLLM` as a checkpoint directory in the release's layout (SPEC 6; `layout` names it all).

`mplus train` saves with this; `load_checkpoint` reads it back. The backbone keeps its HF names except the
LoRA-wrapped linears, which become PEFT's `base_layer` + `lora_A/B.{adapter}` as the release stores them.
A memory's state may ship too (`output` source only: the layout stores memory vectors, which the `input`
source does not have): its pool becomes `memory`, its long-term store and staging cache `ltm.{i}` with keys,
ages (int64) and recall frequencies (float32). Short-term ages and block ids are not part of the layout;
a loaded memory starts its pool at age 0 as the release does (SPEC 4.2).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mplus_agents.checkpoints import layout
from mplus_agents.errors import CheckpointError, InvalidInputError
from mplus_agents.state import MemoryState

if TYPE_CHECKING:
    from mplus_agents.memory import LatentMemory
    from mplus_agents.model import MPlusLLM


def save_checkpoint(
    path: str | Path,
    llm: MPlusLLM,
    *,
    memory: LatentMemory | MemoryState | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    save_tokenizer: bool = True,
) -> Path:
    """Write `llm` (and optionally `memory` as the shipped memory) to the directory `path`.

    The directory appears whole or not at all: everything is written to a sibling temporary directory that
    is renamed into place. `max_shard_bytes` splits the weights into `model-0000i-of-0000n.safetensors`
    shards with an index. An existing non-empty `path` is replaced only with `overwrite=True`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(f"{path} is not empty; pass overwrite=True to replace it")
    state = _state_of(memory)
    config = state.config if state is not None else llm.config
    tensors = _tensors(llm, state)
    cfg = _config(llm, config, state)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / layout.SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map: dict[str, str] = {}
            total = 0
            for i, shard in enumerate(shards, start=1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / file), metadata={"format": "pt"})
                for name, t in shard.items():
                    weight_map[name] = file
                    total += t.numel() * t.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / layout.INDEX_FILE).write_text(json.dumps(index, indent=2))
        (tmp / layout.CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if save_tokenizer:
            saver = getattr(llm.tokenizer, "save_pretrained", None)
            if saver is None:
                raise InvalidInputError(
                    f"the tokenizer ({type(llm.tokenizer).__name__}) has no save_pretrained; pass save_tokenizer=False "
                    "and load with tokenizer="
                )
            saver(str(tmp))
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _state_of(memory: LatentMemory | MemoryState | None) -> MemoryState | None:
    if memory is None or isinstance(memory, MemoryState):
        state = memory
    else:
        with memory.lock:
            state = memory.state
    if state is not None and state.config.source != "output":
        raise InvalidInputError(
            "only an `output`-source memory can ship in a checkpoint: the layout stores memory vectors "
            "(`memory`, `ltm.{i}`), and the `input` source keeps keys and values instead"
        )
    return state


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename the finished temporary directory onto `path` (an old one is moved aside first, then deleted)."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tensors(llm: MPlusLLM, state: MemoryState | None) -> dict[str, torch.Tensor]:
    model: Any = llm.model
    weights = llm.engine.weights
    out: dict[str, torch.Tensor] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    lora = weights.adapters
    wrapped = {f"{t}.weight" for t in lora.targets} if lora is not None else set()
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        out[name.replace(".weight", ".base_layer.weight") if name in wrapped else name] = t
    if lora is not None:
        for adapter in lora.adapters:
            for target in lora.targets:
                ab = lora.weights(adapter, target)
                if ab is not None:
                    out[f"{target}.lora_A.{adapter}.weight"] = ab[0].detach()
                    out[f"{target}.lora_B.{adapter}.weight"] = ab[1].detach()
    if weights.retriever is not None:
        out.update(weights.retriever.release_state_dict())
    if weights.bos is not None:
        out["bos_embedding"] = weights.bos.detach().reshape(llm.engine.arch.shapes.layers, 1, -1)
    if weights.new_memory_emb is not None:
        out["new_memory_positional_emb"] = weights.new_memory_emb.detach().reshape(1, 1, -1)
    if state is not None:
        out.update(_memory_tensors(state))
    return {name: t.detach().to("cpu").contiguous() for name, t in out.items()}


def _memory_tensors(state: MemoryState) -> dict[str, torch.Tensor]:
    assert state.pool.hidden is not None, "output-source states hold memory vectors"
    out = {"memory": state.pool.hidden}
    ltm, staging = state.ltm, state.staging
    if len(ltm) + len(staging) == 0:
        return out
    if ltm.quantized:  # an int8 long-term store (`mplus_agents.quant`): the release layout holds float vectors
        ltm, staging = ltm.to(dtype=state.pool.hidden.dtype), staging.to(dtype=state.pool.hidden.dtype)
    assert ltm.hidden is not None and staging.hidden is not None
    # Staged tokens are searchable already; they ship as long-term entries with a fresh recall frequency.
    hidden = torch.cat([ltm.hidden, staging.hidden.to(ltm.hidden.dtype)], dim=1)
    ages = torch.cat([ltm.age, staging.age], dim=1).to(torch.int64)
    rf_ltm = ltm.rf if ltm.rf is not None else torch.zeros(ltm.age.shape, dtype=torch.float32)
    rf_new = torch.full(staging.age.shape, state.config.ltm_initial_rf, dtype=torch.float32)
    rf = torch.cat([rf_ltm.float().cpu(), rf_new], dim=1)
    keys = None
    if ltm.score_key is not None and staging.score_key is not None:
        keys = torch.cat([ltm.score_key, staging.score_key.to(ltm.score_key.dtype)], dim=1)
    for layer in range(hidden.shape[0]):
        out[f"ltm.{layer}"] = hidden[layer]
        out[f"ltm_ages.{layer}"] = ages[layer]
        out[f"ltm_recall_frequencies.{layer}"] = rf[layer]
        if keys is not None:
            out[f"ltm_keys.{layer}"] = keys[layer]
    return out


def _config(llm: MPlusLLM, config: Any, state: MemoryState | None) -> dict[str, Any]:
    model: Any = llm.model
    weights = llm.engine.weights
    cfg: dict[str, Any] = {
        k: v for k, v in model.config.to_dict().items() if k not in ("rope_parameters", "dtype", "torch_dtype")
    }
    # Release-style rope fields (SPEC 6.1): rope_theta plus rope_scaling (None for plain RoPE).
    rope = dict(getattr(model.config, "rope_parameters", None) or {})
    cfg["rope_theta"] = rope.pop("rope_theta", getattr(model.config, "rope_theta", 10000.0))
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    cfg["torch_dtype"] = str(llm.engine.arch.dtype).removeprefix("torch.")
    cfg.pop("_name_or_path", None)

    k = config.tokens_per_chunk
    retriever = weights.retriever
    lora = weights.adapters
    ltm_rows = 0 if state is None else len(state.ltm) + len(state.staging)
    cfg.update(
        num_tokens=k,
        num_ltm_blocks=config.retrieve_tokens // k,
        num_blocks=config.pool_size // k + config.retrieve_tokens // k,
        ltm_initial_size=ltm_rows,
        add_selector=retriever is not None,
        add_encoder_retriever=retriever is not None and retriever.encoder_query_proj is not None,
        add_bos_embedding=weights.bos is not None,
        add_decoder_lora=lora is not None and "decoder_adapter" in lora.adapters,
        drop_memory_per_layer=config.drop_policy == "random",
        update_ltm_frequency=config.ltm_merge_every,
        decay_frequency=config.ltm_decay,
        initial_rf_when_moving_stm_to_ltm=config.ltm_initial_rf,
    )
    if retriever is not None:
        cfg.update(selector_hidden_dim=retriever.dim, num_selector_layers=2)
    if lora is not None:
        cfg["lora_config"] = {
            "r": lora.r,
            "lora_alpha": lora.alpha,
            "lora_dropout": 0.0,
            "use_rslora": lora.rslora,
            "target_modules": sorted({t.rsplit(".", 1)[-1] for t in lora.targets}),
            "inference_mode": True,
        }
    key_input = retriever.key_input if retriever is not None else ("hidden" if config.source == "output" else "kv")
    cfg[layout.OUR_KEY] = {
        "format": layout.FORMAT,
        "source": config.source,
        "key_input": key_input,
        "memory_config": json.loads(config.to_json()),
        "base_model": llm.name,
    }
    return cfg


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order; a tensor larger than `max_bytes` gets a shard of its own."""
    if max_bytes is None:
        return [tensors]
    if max_bytes < 1:
        raise InvalidInputError("max_shard_bytes must be positive")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards
