"""Files `mplus train` writes: the retriever on its own, and a checkpoint directory.

`retriever.safetensors` holds only the trained layers' projectors under the release's names
(`model.layers.{i}.self_attn.{query_proj,key_proj}.{0,2}.weight`, SPEC 6.2) with what is needed to rebuild
them in its metadata. It is a few MB, so a trained retriever can ship without the base model's weights and be
attached to the base model at load time (`attach_retriever`). The full checkpoint directory (layout contract
of issue 6: config.json with an `mplus_agents` key, weights, tokenizer) is what `MPlusLLM.from_pretrained`
loads; `save_trained` writes it with `mplus_agents.checkpoints.save_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from mplus_agents.config import MemoryConfig
from mplus_agents.errors import InvalidInputError
from mplus_agents.model import MPlusLLM
from mplus_agents.retriever import Retriever

RETRIEVER_FILE = "retriever.safetensors"
PROJECTORS = ("query_proj", "key_proj")


def save_retriever(path: Path, retriever: Retriever, layers: list[int], meta: dict[str, Any]) -> Path:
    target = Path(path) / RETRIEVER_FILE
    info = dict(meta, layers=layers, dim=retriever.dim, key_input=retriever.key_input, total_layers=retriever.layers)
    tmp = target.with_suffix(".tmp")
    save_file(retriever.release_state_dict(layers), str(tmp), metadata={"mplus_agents": json.dumps(info)})
    os.replace(tmp, target)
    return target


def load_retriever(path: str | Path) -> tuple[Retriever, dict[str, Any]]:
    """A `Retriever` from a `retriever.safetensors` (or the directory holding one) and its metadata."""
    file = Path(path)
    if file.is_dir():
        file = file / RETRIEVER_FILE
    if not file.exists():
        raise InvalidInputError(f"no trained retriever at {file} (`mplus train` writes {RETRIEVER_FILE})")
    with safe_open(str(file), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("mplus_agents", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if "layers" not in meta:
        raise InvalidInputError(f"{file} is not a retriever written by `mplus train` (no metadata)")
    some = next(iter(tensors.values()))
    first = meta["layers"][0]
    q0 = tensors[f"model.layers.{first}.self_attn.query_proj.0.weight"]
    k0 = tensors[f"model.layers.{first}.self_attn.key_proj.0.weight"]
    retriever = Retriever(meta["total_layers"], q0.shape[1], k0.shape[1], meta["dim"], key_input=meta["key_input"])
    retriever.to(some.dtype)
    for layer in meta["layers"]:
        for name in PROJECTORS:
            proj = getattr(retriever, name)[layer]
            for idx in (0, 2):
                proj[idx].weight.data.copy_(tensors[f"model.layers.{layer}.self_attn.{name}.{idx}.weight"])
    return retriever.eval(), meta


def attach_retriever(llm: MPlusLLM, retriever: Retriever, config: MemoryConfig | None = None) -> MPlusLLM:
    """The same base model with `retriever` as its trained projectors (weights are shared, not copied)."""
    s = llm.engine.arch.shapes
    expected = s.hidden_size if retriever.key_input == "hidden" else 2 * s.kv_heads * s.head_dim
    first: Any = retriever.key_proj[0]
    key_in = int(first[0].weight.shape[1])
    if retriever.layers != s.layers or key_in != expected:
        raise InvalidInputError(
            f"this retriever was trained for a {retriever.layers}-layer model with {key_in}-wide keys; "
            f"{llm.name} has {s.layers} layers and {expected}-wide keys"
        )
    weights = dataclasses.replace(llm.engine.weights, retriever=retriever.to(llm.engine.arch.device))
    cfg = config or llm.config.replace(scorer="retriever")
    out = MPlusLLM(llm.model, llm.tokenizer, cfg, frame=llm.frame, weights=weights, name=llm.name)
    return out


def save_trained(path: Path, llm: MPlusLLM) -> None:
    """Write the checkpoint directory. The writer replaces the whole directory, so callers write their own
    extra files afterwards."""
    from mplus_agents.checkpoints import save_checkpoint

    has_files = getattr(llm.tokenizer, "save_pretrained", None) is not None  # test tokenizers have no files
    save_checkpoint(path, llm, overwrite=True, save_tokenizer=has_files)
