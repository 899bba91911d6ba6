"""Tiny random checkpoints written in exactly the published layouts (SPEC 6.1, 6.2), without our writer.

The tensors are written by hand with safetensors under the release's names (PEFT `base_layer` / `lora_A.{adapter}`
naming, `.0`/`.2` projectors, `ltm.{i}` ParameterList names), so the loader is tested against the format
itself, not against our own writer. `Published.raw` keeps every tensor written, which the literal reference
uses directly (merged weights W + s*B*A per adapter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

Style = Literal["mplus", "memoryllm"]
LORA_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
NOT_BACKBONE = ("memory", "bos_", "new_memory", "ltm", "initialized")
ADAPTERS = ("default", "decoder_adapter")


@dataclass
class Published:
    path: Path
    config: dict[str, Any]
    raw: dict[str, torch.Tensor] = field(repr=False)
    r: int
    alpha: float

    @property
    def layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def num_tokens(self) -> int:
        return int(self.config["num_tokens"])

    @property
    def generation_adapter(self) -> str:
        """`decoder_adapter` when shipped; a single-adapter checkpoint generates with `default` too."""
        return "decoder_adapter" if any(".decoder_adapter." in name for name in self.raw) else "default"

    def backbone_config(self) -> LlamaConfig:
        keep = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "rope_theta",
            "rope_scaling",
            "rms_norm_eps",
            "bos_token_id",
            "eos_token_id",
            "tie_word_embeddings",
            "hidden_act",
        )
        return LlamaConfig(**{k: self.config[k] for k in keep if k in self.config})

    def merged_model(self, adapter: str | None) -> LlamaForCausalLM:
        """A plain HF model holding W + (alpha/r) B A of `adapter` (None: the bare backbone)."""
        model = LlamaForCausalLM(self.backbone_config()).eval()
        state = {}
        for name, t in self.raw.items():
            if ".lora_" in name or name.startswith(NOT_BACKBONE) or name.endswith(("_proj.0.weight", "_proj.2.weight")):
                continue
            state[name.replace(".base_layer.", ".")] = t.clone()
        if adapter is not None:
            for layer in range(self.layers):
                for target in LORA_TARGETS:
                    stem = f"model.layers.{layer}.{target}"
                    a = self.raw[f"{stem}.lora_A.{adapter}.weight"]
                    b = self.raw[f"{stem}.lora_B.{adapter}.weight"]
                    state[f"{stem}.weight"] = state[f"{stem}.weight"] + (self.alpha / self.r) * (b @ a)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        return model

    def projector(self, kind: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Linear -> SiLU -> Linear with the raw `.0` / `.2` weights."""
        w0 = self.raw[f"model.layers.{layer}.self_attn.{kind}.0.weight"]
        w2 = self.raw[f"model.layers.{layer}.self_attn.{kind}.2.weight"]
        return torch.nn.functional.silu(x @ w0.T) @ w2.T


def write_published(
    path: Path,
    style: Style = "mplus",
    *,
    sharded: bool = False,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 32,
    num_tokens: int = 4,
    ltm_size: int = 12,
    selector_dim: int = 8,
    r: int = 4,
    alpha: float = 8.0,
    adapters: tuple[str, ...] = ADAPTERS,
) -> Published:
    """Write a tiny random mplus-8b style (STM + LTM + retriever, llama3 rope) or MemoryLLM-8B style (STM only,
    linear RoPE scaling 1.8125) checkpoint into `path`."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg: dict[str, Any] = dict(
        architectures=["MPlus" if style == "mplus" else "MemoryLLM"],
        model_type="llama",
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        tie_word_embeddings=False,
        torch_dtype="float32",
        num_tokens=num_tokens,
        add_bos_embedding=True,
        add_decoder_lora="decoder_adapter" in adapters,
        drop_memory_per_layer=True,
        lora_config={
            "inference_mode": False,
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": 0.1,
            "target_modules": ["q_proj", "v_proj", "k_proj", "up_proj", "down_proj", "gate_proj"],
        },
    )
    if style == "mplus":
        cfg.update(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
            num_blocks=6,
            num_ltm_blocks=2,
            ltm_initial_size=ltm_size,
            selector_hidden_dim=selector_dim,
            num_selector_layers=2,
            add_selector=True,
            add_encoder_retriever=True,
            map_from_hidden_states=True,
            update_ltm_mode="immediate",
            update_ltm_frequency=3,
            decay_frequency=1,
            initial_rf_when_moving_stm_to_ltm=10,
            _attn_implementation="flash_attention_2",
        )
        pool = num_tokens * (6 - 2)
    else:
        cfg.update(
            rope_theta=500000.0,
            rope_scaling={"type": "linear", "factor": 1.8125},
            num_blocks=5,
            num_memory_tokens=5 * num_tokens,
            max_seq_length=64,
        )
        pool = 5 * num_tokens

    backbone = LlamaForCausalLM(
        LlamaConfig(
            **{k: v for k, v in cfg.items() if k in LlamaConfig().to_dict() or k in ("rope_theta", "rope_scaling")}
        )
    )
    raw: dict[str, torch.Tensor] = {}
    wrapped = {f"model.layers.{i}.{t}.weight" for i in range(layers) for t in LORA_TARGETS}
    for name, t in backbone.state_dict().items():
        raw[name.replace(".weight", ".base_layer.weight") if name in wrapped else name] = t.clone()
    for i in range(layers):
        for target in LORA_TARGETS:
            module = backbone.get_submodule(f"model.layers.{i}.{target}")
            for adapter in adapters:
                stem = f"model.layers.{i}.{target}"
                raw[f"{stem}.lora_A.{adapter}.weight"] = torch.randn(r, module.in_features, generator=gen) * 0.1
                raw[f"{stem}.lora_B.{adapter}.weight"] = torch.randn(module.out_features, r, generator=gen) * 0.1
    raw["bos_embedding"] = torch.randn(layers, 1, hidden, generator=gen) * 0.5
    raw["new_memory_positional_emb"] = torch.randn(1, 1, hidden, generator=gen) * 0.5
    raw["memory"] = torch.randn(layers, pool, hidden, generator=gen)
    raw["initialized"] = torch.ones(1, dtype=torch.uint8)
    if style == "mplus":
        for i in range(layers):
            for kind in ("query_proj", "key_proj", "encoder_query_proj"):
                stem = f"model.layers.{i}.self_attn.{kind}"
                raw[f"{stem}.0.weight"] = torch.randn(2 * selector_dim, hidden, generator=gen)
                raw[f"model.layers.{i}.self_attn.{kind}.2.weight"] = (
                    torch.randn(selector_dim, 2 * selector_dim, generator=gen) * 0.3
                )
            raw[f"ltm.{i}"] = torch.randn(ltm_size, hidden, generator=gen)
            raw[f"ltm_keys.{i}"] = torch.randn(ltm_size, selector_dim, generator=gen)
            # Ages above 256 that bf16 cannot hold exactly (4097 -> 4096), and non-integral recall counters.
            # The release keeps ages in float32 Parameters; float32 holds these exactly, bf16 would not.
            raw[f"ltm_ages.{i}"] = (4097 + 3 * torch.randperm(ltm_size, generator=gen)).to(torch.float32)
            raw[f"ltm_recall_frequencies.{i}"] = 9.0 + torch.rand(ltm_size, generator=gen, dtype=torch.float32) / 3
    raw = {k: v.contiguous() for k, v in raw.items()}

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if sharded:
        names = sorted(raw)
        parts = [names[: len(names) // 3], names[len(names) // 3 : 2 * len(names) // 3], names[2 * len(names) // 3 :]]
        weight_map = {}
        for i, part in enumerate(parts, start=1):
            file = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
            save_file({n: raw[n] for n in part}, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in raw.values())},
            "weight_map": weight_map,
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(raw, str(path / "model.safetensors"), metadata={"format": "pt"})
    return Published(path=path, config=cfg, raw=raw, r=r, alpha=alpha)


def rewrite(pub: Published, raw: dict[str, torch.Tensor] | None = None, config: dict[str, Any] | None = None) -> None:
    """Overwrite a single-file checkpoint's weights and/or config (for the bad-input tests)."""
    if raw is not None:
        save_file({k: v.contiguous() for k, v in raw.items()}, str(pub.path / "model.safetensors"))
    if config is not None:
        (pub.path / "config.json").write_text(json.dumps(config))
