"""The checkpoint directory layout (SPEC 6.1, 6.2): config keys, weight names, and reading the file index.

One module owns every name, so the loader and the writer cannot drift apart. A checkpoint is a local
directory with `config.json` (Llama-family backbone fields plus the M+ keys, and our own additions under the
single key `mplus_agents`), the weights as `model.safetensors` or shards listed by
`model.safetensors.index.json`, and the tokenizer files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mplus_agents.errors import CheckpointError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
OUR_KEY = "mplus_agents"
FORMAT = 1

MPLUS_KEYS = (
    "num_tokens",
    "num_blocks",
    "num_ltm_blocks",
    "num_memory_tokens",
    "ltm_initial_size",
    "selector_hidden_dim",
    "num_selector_layers",
    "add_selector",
    "add_encoder_retriever",
    "add_bos_embedding",
    "add_decoder_lora",
    "drop_memory_per_layer",
    "lora_config",
    "update_ltm_frequency",
    "update_ltm_mode",
    "decay_frequency",
    "initial_rf_when_moving_stm_to_ltm",
    "map_from_hidden_states",
    "detach_hidden_state",
    "max_seq_length",
    "interpolate_position_ids",
    "selector_layers",
)
"""Config keys of the release that are not backbone fields (SPEC 6.1); they never reach the HF config."""
MARKER_KEYS = ("num_tokens", "num_blocks", OUR_KEY)
"""A config.json holding any of these is an M+ checkpoint, not a plain Hugging Face model directory."""
NOT_BACKBONE = (
    *MPLUS_KEYS,
    "architectures",
    "auto_map",
    "torch_dtype",
    "dtype",
    "_attn_implementation",
    "attn_implementation",
    "_name_or_path",
    "transformers_version",
)

PROJECTORS = ("query_proj", "key_proj", "encoder_query_proj")
IGNORED = ("initialized",)

_LAYER = r"model\.layers\.(\d+)\."
BASE_LAYER = re.compile(r"^(.*)\.base_layer\.(weight|bias)$")
LORA = re.compile(r"^(.*)\.lora_([AB])\.([^.]+)\.weight$")
PROJECTOR = re.compile(_LAYER + r"self_attn\.(" + "|".join(PROJECTORS) + r")\.([02])\.weight$")
LTM = re.compile(r"^(ltm|ltm_keys|ltm_recall_frequencies|ltm_ages)\.(\d+)$")
MEMORY_KEYS = ("memory", "bos_embedding", "new_memory_positional_emb")


@dataclass
class Names:
    """The weight names of a checkpoint, sorted into the groups of SPEC 6.2."""

    backbone: dict[str, str] = field(default_factory=dict)
    """Stock HF parameter name -> name in the file (`x.base_layer.weight` for a LoRA-wrapped linear)."""
    lora: dict[tuple[str, str, str], str] = field(default_factory=dict)
    """(module path, adapter, "A" | "B") -> name in the file."""
    projectors: dict[tuple[str, int, str], str] = field(default_factory=dict)
    """(projector, layer, "0" | "2") -> name in the file."""
    memory: dict[str, str] = field(default_factory=dict)
    """`memory` / `bos_embedding` / `new_memory_positional_emb` -> the same name."""
    ltm: dict[tuple[str, int], str] = field(default_factory=dict)
    """(`ltm` | `ltm_keys` | `ltm_recall_frequencies` | `ltm_ages`, layer) -> name in the file."""
    duplicates: list[str] = field(default_factory=list)
    """Backbone parameters present both plain and as `base_layer` (contradictory)."""


def sort_names(names: list[str]) -> Names:
    out = Names()
    for name in names:
        if name in IGNORED:
            continue
        if name in MEMORY_KEYS:
            out.memory[name] = name
        elif m := LTM.match(name):
            out.ltm[(m.group(1), int(m.group(2)))] = name
        elif m := PROJECTOR.match(name):
            out.projectors[(m.group(2), int(m.group(1)), m.group(3))] = name
        elif m := LORA.match(name):
            out.lora[(m.group(1), m.group(3), m.group(2))] = name
        else:
            m = BASE_LAYER.match(name)
            stock = f"{m.group(1)}.{m.group(2)}" if m else name
            if stock in out.backbone:
                out.duplicates.append(stock)
            out.backbone[stock] = name
    return out


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, refusing anything that is not one."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} holds no {CONFIG_FILE}; it is not a model checkpoint")
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object")
    return data


def is_checkpoint(path: str | Path) -> bool:
    """True for a directory whose config.json carries M+ keys (plain HF model dirs return False)."""
    p = Path(path)
    cfg = p / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and any(k in data for k in MARKER_KEYS)


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    from safetensors import safe_open

    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a safetensors index with a weight_map: {err}") from err
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object")
        files = {name: path / str(file) for name, file in weight_map.items()}
        absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if absent:
            raise CheckpointError(f"{index} lists shard files that are not in {path}: {absent}")
        # The index must describe the shards truthfully: every listed tensor is in its shard and no shard
        # holds tensors the index does not mention.
        listed: dict[Path, set[str]] = {}
        for name, file in files.items():
            listed.setdefault(file, set()).add(name)
        for file, names in listed.items():
            with safe_open(str(file), framework="pt") as f:
                held = set(f.keys())
            if names - held:
                raise CheckpointError(f"{index} maps {sorted(names - held)} to {file.name}, which lacks them")
            if held - names:
                raise CheckpointError(f"{file.name} holds {sorted(held - names)} that {index.name} does not list")
        return files
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return dict.fromkeys(f.keys(), single)
        except Exception as err:  # safetensors raises its own error types for a corrupt header
            raise CheckpointError(f"{single} is not a readable safetensors file: {err}") from err
    raise CheckpointError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}; no weights to load")
