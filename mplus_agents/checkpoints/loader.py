"""Load an M+ / MemoryLLM checkpoint directory into an `MPlusLLM` (SPEC 6, issue 6 item 1).

The backbone becomes a stock transformers Llama-family model built from config.json (so MemoryLLM-8B's linear
RoPE scaling and Llama-3.1's `llama3` rope both come from the model's own rotary module, and any attention
backend runs); PEFT's `base_layer` names map back to the stock linears and the two adapters become a `LoRA`
hooked onto them; the projectors become a `Retriever`; BOS vectors and e_new become `MPlusWeights`. The
shipped short-term pool and long-term store become every new memory's initial state (`ShippedMemory`).

Every check runs on names and shapes before any tensor is read, so a bad directory fails fast with one
message listing all the missing, unexpected or misshapen weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mplus_agents.checkpoints import layout
from mplus_agents.checkpoints.layout import Names
from mplus_agents.config import MemoryConfig
from mplus_agents.errors import CheckpointError, InvalidInputError
from mplus_agents.hf.arch import SUPPORTED_MODEL_TYPES
from mplus_agents.lora import GENERATE, UPDATE, LoRA
from mplus_agents.retriever import Retriever
from mplus_agents.state import MemoryState, TokenStore

if TYPE_CHECKING:
    from mplus_agents.model import MPlusLLM


@dataclass(frozen=True)
class CheckpointInfo:
    """What config.json says about the memory, with SPEC 6.1 defaults for published checkpoints."""

    published: bool
    """No `mplus_agents` key: a release checkpoint, read with the release's semantics."""
    source: str
    key_input: str
    memory_config: MemoryConfig
    base_model: str | None = None


@dataclass
class ShippedMemory:
    """The memory a checkpoint ships (`memory`, `ltm.{i}`, ...), kept as memory vectors in the file's dtype.

    Turned into a `MemoryState` per memory config on first use: K/V come from each layer's own projections
    under the generation adapter (what reads see), retriever keys from the file or, when absent, from f_k as
    at injection. Ages and recall frequencies stay int64 / float32 as read, never through bf16 (SPEC 9.1.8).
    STM ages start at 0 (SPEC 4.2).
    """

    source: str
    pool: torch.Tensor
    """[L, N, d] short-term memory vectors."""
    ltm: torch.Tensor | None = None
    """[L, M, d] long-term memory vectors."""
    ltm_keys: torch.Tensor | None = None
    """[L, M, dim] cached f_k outputs."""
    ltm_ages: torch.Tensor | None = None
    """[L, M] int64."""
    ltm_rf: torch.Tensor | None = None
    """[L, M] float32."""
    _states: dict[MemoryConfig, MemoryState] = field(default_factory=dict, repr=False)

    def state_for(self, llm: MPlusLLM, config: MemoryConfig) -> MemoryState:
        """The initial state of a memory with `config` (empty for the other source). Built once per config;
        sharing it is safe because every memory operation returns new tensors (DESIGN 2)."""
        template = llm.empty_state(config)
        if config.source != self.source:
            return template
        if config not in self._states:
            self._states[config] = self._build(llm, config, template)
        return self._states[config]

    def _build(self, llm: MPlusLLM, config: MemoryConfig, template: MemoryState) -> MemoryState:
        n = int(self.pool.shape[1])
        if n > config.pool_size:
            raise InvalidInputError(
                f"the checkpoint ships {n} short-term memory tokens per layer, more than pool_size={config.pool_size}"
            )
        m = 0 if self.ltm is None else int(self.ltm.shape[1])
        bs = config.block_size
        ltm_blocks = (m + bs - 1) // bs  # blocks never span the long-term store and the pool
        pool = self._store(llm, self.pool, template.pool, ltm_blocks + torch.arange(n) // bs)
        ltm = template.ltm
        if self.ltm is not None:
            ltm = self._store(llm, self.ltm, template.ltm, torch.arange(m) // bs, keys=self.ltm_keys)
            assert self.ltm_ages is not None and self.ltm_rf is not None
            ltm = ltm.with_fields(
                age=self.ltm_ages.to(device=ltm.k.device, dtype=torch.int64),
                rf=self.ltm_rf.to(device=ltm.k.device, dtype=torch.float32),
            )
        next_block = ltm_blocks + (n + bs - 1) // bs
        return dataclasses.replace(template, pool=pool, ltm=ltm, next_block=next_block)

    @staticmethod
    def _store(
        llm: MPlusLLM, hidden: torch.Tensor, like: TokenStore, block: torch.Tensor, keys: torch.Tensor | None = None
    ) -> TokenStore:
        engine = llm.engine
        arch = engine.arch
        h = hidden.to(device=arch.device, dtype=arch.dtype)
        lora = engine.weights.adapters
        with torch.no_grad(), lora.use(lora.generate) if lora is not None else _null():
            k, v = arch.kv_all_layers(h)
        layers, count = int(h.shape[0]), int(h.shape[1])
        blocks = block.to(torch.int64).expand(layers, count).clone()
        store = TokenStore(k=k, v=v, age=torch.zeros_like(blocks), block=blocks, hidden=h)
        if like.score_key is not None:
            score = keys if keys is not None else engine.score_keys(store)
            assert score is not None
            store.score_key = score
        if like.rf is not None:
            store.rf = torch.zeros(layers, count, dtype=torch.float32)
        if like.word is not None:  # no words are known for shipped vectors
            store.word = torch.zeros(layers, count, dtype=torch.int64)
        dev = like.k.device
        return store.to(dtype=like.k.dtype, device=dev).with_fields(age=store.age.to(dev), block=store.block.to(dev))


def _null() -> Any:
    import contextlib

    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- config


def _int(cfg: dict[str, Any], key: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"config.json: {key} must be a non-negative integer, got {value!r}")
    return value


def read_info(cfg: dict[str, Any], names: Names) -> CheckpointInfo:
    """Memory settings from config.json: our `mplus_agents` block, else SPEC 6.1's keys."""
    ours = cfg.get(layout.OUR_KEY)
    if ours is not None:
        if not isinstance(ours, dict):
            raise CheckpointError(f"config.json: {layout.OUR_KEY} must be an object")
        if ours.get("format") != layout.FORMAT:
            raise CheckpointError(
                f"config.json: {layout.OUR_KEY}.format is {ours.get('format')!r}; this version reads format "
                f"{layout.FORMAT}"
            )
        source = ours.get("source")
        key_input = ours.get("key_input", "hidden" if source == "output" else "kv")
        if source not in ("input", "output") or key_input not in ("hidden", "kv"):
            raise CheckpointError(
                f"config.json: {layout.OUR_KEY}.source must be input|output and key_input hidden|kv, got "
                f"{source!r} / {key_input!r}"
            )
        try:
            mc = MemoryConfig.from_json(json.dumps(ours["memory_config"]))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"config.json: {layout.OUR_KEY}.memory_config is not a MemoryConfig: {err}") from err
        if mc.source != source:
            raise CheckpointError(
                f"config.json: {layout.OUR_KEY}.source is {source!r} but its memory_config.source is {mc.source!r}"
            )
        return CheckpointInfo(False, source, key_input, mc, ours.get("base_model"))

    k = _int(cfg, "num_tokens")
    blocks = _int(cfg, "num_blocks")
    ltm_blocks = _int(cfg, "num_ltm_blocks", 0)
    if k < 1 or blocks <= ltm_blocks:
        raise CheckpointError(
            f"config.json: num_tokens={k}, num_blocks={blocks}, num_ltm_blocks={ltm_blocks} leave no short-term memory"
        )
    scorer = "retriever" if names.projectors else "sigmoid_mean"
    try:
        if ltm_blocks:  # mplus-8b: STM + LTM, retrieval per layer, rf decay (SPEC 4.3)
            mc = MemoryConfig.mplus(
                pool_size=k * (blocks - ltm_blocks),
                retrieve_tokens=k * ltm_blocks,
                tokens_per_chunk=k,
                scorer=scorer,
                ltm_merge_every=_int(cfg, "update_ltm_frequency", 60) or 1,
                ltm_initial_rf=float(cfg.get("initial_rf_when_moving_stm_to_ltm", 10)),
                ltm_decay=float(cfg.get("decay_frequency", 1)),
            )
        else:  # MemoryLLM-8B: STM only; dropped tokens are discarded (a long-term store that holds nothing)
            pool = _int(cfg, "num_memory_tokens", k * blocks)
            mc = MemoryConfig.mplus(
                pool_size=pool,
                retrieve_tokens=0,
                tokens_per_chunk=k,
                scorer=scorer,
                ltm_merge_every=1,
                ltm_decay=0.0,
                ltm_max_tokens=0,
            )
    except ValueError as err:
        raise CheckpointError(f"config.json: the M+ keys give an invalid memory config: {err}") from err
    return CheckpointInfo(True, "output", "hidden", mc)


def backbone_config(cfg: dict[str, Any]) -> Any:
    """The transformers config of the backbone: every key except the M+ ones and our own block."""
    from transformers import AutoConfig

    model_type = cfg.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"config.json: model_type {model_type!r} is not a supported backbone ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    fields = {k: v for k, v in cfg.items() if k not in layout.NOT_BACKBONE and k != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"config.json: the backbone fields do not make a {model_type} config: {err}") from err


# ---------------------------------------------------------------------------------------------- checks


def _shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the safetensors headers (no tensor data is loaded)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    out: dict[str, tuple[int, ...]] = {}
    for file, wanted in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in wanted:
                out[name] = tuple(f.get_slice(name).get_shape())
    return out


@dataclass
class Problems:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)
    contradictions: list[str] = field(default_factory=list)

    def raise_if_any(self, path: Path) -> None:
        parts = []
        if self.missing:
            parts.append(f"missing weights: {_listing(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected weights: {_listing(self.unexpected)}")
        if self.shapes:
            parts.append(f"shape mismatches: {_listing(self.shapes)}")
        if self.contradictions:
            parts.append(f"config.json contradicts the weights: {_listing(self.contradictions)}")
        if parts:
            raise CheckpointError(f"cannot load the checkpoint {path}: " + "; ".join(parts))


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _flag(cfg: dict[str, Any], key: str, present: bool, what: str, problems: Problems) -> None:
    """An explicit `add_*` flag in config.json must agree with the weights."""
    if key in cfg and bool(cfg[key]) != present:
        state = "has" if present else "lacks"
        problems.contradictions.append(f"{key}={cfg[key]} but the checkpoint {state} {what}")


# ---------------------------------------------------------------------------------------------- loader


def load_checkpoint(
    path: str | Path,
    tokenizer: Any = None,
    config: MemoryConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **model_kwargs: Any,
) -> MPlusLLM:
    """Load a checkpoint directory (see `layout`); `config` overrides the memory config it derives."""
    from mplus_agents.engine import MPlusWeights
    from mplus_agents.model import MPlusLLM, default_device

    path = Path(path)
    cfg = layout.read_config(path)
    files = layout.weight_files(path)
    names = layout.sort_names(list(files))
    info = read_info(cfg, names)
    hf_config = backbone_config(cfg)
    dtype = dtype or torch.float32
    device = torch.device(device) if device is not None else default_device()

    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_config(hf_config, **model_kwargs)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    layers = int(hf_config.num_hidden_layers)
    hidden = int(hf_config.hidden_size)

    problems = Problems()
    shape_of = _shapes(files)

    # Backbone.
    for stock in sorted(names.duplicates):
        problems.unexpected.append(f"{stock} (given both plain and as base_layer)")
    for stock, name in sorted(names.backbone.items()):
        if stock not in expected:
            if not (tied and stock == "lm_head.weight"):
                problems.unexpected.append(name)
        elif shape_of[name] != expected[stock]:
            problems.shapes.append(f"{name} {shape_of[name]}, expected {expected[stock]}")
    for stock in sorted(expected):
        if stock not in names.backbone and not (tied and stock == "lm_head.weight"):
            problems.missing.append(stock)

    lora = _check_lora(cfg, names, expected, shape_of, problems)
    retriever_dims = _check_projectors(cfg, names, info, hf_config, shape_of, problems)
    _check_memory(cfg, names, info, layers, hidden, shape_of, problems, retriever_dims)
    problems.raise_if_any(path)

    # Everything fits: read the tensors (floating weights in the target dtype; ages and counters untouched).
    tensors = _read(files, names, dtype, device)
    backbone = {stock: tensors[name] for stock, name in names.backbone.items() if stock in expected}
    model.load_state_dict(backbone, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    _fresh_rotary(model, device, dtype if info.published else None)
    stale = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if stale:
        raise CheckpointError(f"cannot load the checkpoint {path}: no values for {_listing(stale)}")
    model.eval()

    adapters = None
    if lora is not None:
        r, alpha, rslora, pairs = lora
        adapters = LoRA(r, alpha, rslora=rslora, generate=GENERATE if GENERATE in {a for _, a in pairs} else UPDATE)
        for target, adapter in pairs:
            adapters.add(
                adapter,
                target,
                tensors[names.lora[(target, adapter, "A")]],
                tensors[names.lora[(target, adapter, "B")]],
            )
        adapters.attach(model)

    retriever = None
    if retriever_dims is not None:
        q_in, k_in, dim, encoder = retriever_dims
        with torch.device("meta"):  # no random init of weights about to be replaced (214M parameters at 8B)
            retriever = Retriever(layers, q_in, k_in, dim, key_input=info.key_input, encoder=encoder)  # type: ignore[arg-type]
        state = {f"{proj}.{layer}.{idx}.weight": tensors[name] for (proj, layer, idx), name in names.projectors.items()}
        retriever.load_state_dict(state, strict=True, assign=True)
        retriever.eval()

    bos = tensors.get("bos_embedding")
    e_new = tensors.get("new_memory_positional_emb")
    weights = MPlusWeights(
        bos=bos,
        new_memory_emb=e_new.reshape(-1) if e_new is not None else None,
        retriever=retriever,
        adapters=adapters,
    )
    if tokenizer is None:
        tokenizer = _tokenizer(path)
    llm = MPlusLLM(model, tokenizer, config or info.memory_config, weights=weights, name=path.name)
    llm.checkpoint = info
    if "memory" in tensors:
        llm.initial_memory = _shipped(info, tensors, names, layers)
    return llm


def _check_lora(
    cfg: dict[str, Any],
    names: Names,
    expected: dict[str, tuple[int, ...]],
    shape_of: dict[str, tuple[int, ...]],
    problems: Problems,
) -> tuple[int, float, bool, list[tuple[str, str]]] | None:
    adapters = sorted({a for _, a, _ in names.lora})
    lora_cfg = cfg.get("lora_config")
    _flag(cfg, "add_decoder_lora", GENERATE in adapters, f"a {GENERATE!r} LoRA adapter", problems)
    if not names.lora:
        if lora_cfg is not None:
            problems.contradictions.append("lora_config is set but the weights hold no LoRA adapters")
        return None
    if not isinstance(lora_cfg, dict) or not isinstance(lora_cfg.get("r"), int) or lora_cfg["r"] < 1:
        problems.contradictions.append(f"the weights hold LoRA adapters {adapters} but lora_config has no rank r")
        return None
    r = int(lora_cfg["r"])
    alpha = float(lora_cfg.get("lora_alpha", r))
    rslora = bool(lora_cfg.get("use_rslora", False))
    unknown = [a for a in adapters if a not in (UPDATE, GENERATE)]
    if unknown:
        problems.unexpected.extend(
            f"{t}.lora_{ab}.{a}.weight (adapter {a!r} is neither {UPDATE!r} nor {GENERATE!r})"
            for (t, a, ab) in names.lora
            if a in unknown
        )
    targets = sorted({t for t, _, _ in names.lora})
    pairs: list[tuple[str, str]] = []
    for target in targets:
        weight = expected.get(f"{target}.weight")
        if weight is None or len(weight) != 2:
            problems.unexpected.extend(n for (t, _, _), n in names.lora.items() if t == target)
            continue
        out_f, in_f = weight
        for adapter in adapters:
            if adapter in unknown:
                continue
            for ab, want in (("A", (r, in_f)), ("B", (out_f, r))):
                name = names.lora.get((target, adapter, ab))
                if name is None:
                    problems.missing.append(f"{target}.lora_{ab}.{adapter}.weight")
                elif shape_of[name] != want:
                    problems.shapes.append(f"{name} {shape_of[name]}, expected {want} (lora_config r={r})")
            pairs.append((target, adapter))
    return r, alpha, rslora, pairs


def _check_projectors(
    cfg: dict[str, Any],
    names: Names,
    info: CheckpointInfo,
    hf_config: Any,
    shape_of: dict[str, tuple[int, ...]],
    problems: Problems,
) -> tuple[int, int, int, bool] | None:
    layers = int(hf_config.num_hidden_layers)
    kinds = sorted({p for p, _, _ in names.projectors})
    _flag(cfg, "add_selector", bool(kinds), "retriever projectors", problems)
    _flag(cfg, "add_encoder_retriever", "encoder_query_proj" in kinds, "encoder_query_proj projectors", problems)
    if not kinds:
        return None
    if cfg.get("num_selector_layers", 2) != 2:
        problems.contradictions.append(
            f"num_selector_layers={cfg['num_selector_layers']}; only 2-layer projectors exist"
        )
    hidden = int(hf_config.hidden_size)
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
    key_in = hidden if info.key_input == "hidden" else 2 * kv_heads * head_dim
    first = names.projectors.get(("query_proj", 0, "2")) or next(iter(names.projectors.values()))
    dim = shape_of[first][0]
    want_dim = cfg.get("selector_hidden_dim")
    if want_dim is not None and want_dim != dim:
        problems.contradictions.append(f"selector_hidden_dim={want_dim} but the projectors are {dim} wide")
    for kind in ("query_proj", "key_proj", *(["encoder_query_proj"] if "encoder_query_proj" in kinds else [])):
        d_in = key_in if kind == "key_proj" else hidden
        for layer in range(layers):
            for idx, want in (("0", (2 * dim, d_in)), ("2", (dim, 2 * dim))):
                name = names.projectors.get((kind, layer, idx))
                if name is None:
                    problems.missing.append(f"model.layers.{layer}.self_attn.{kind}.{idx}.weight")
                elif shape_of[name] != want:
                    problems.shapes.append(f"{name} {shape_of[name]}, expected {want}")
    problems.unexpected.extend(n for (_, layer, _), n in names.projectors.items() if layer >= layers)
    return hidden, key_in, dim, "encoder_query_proj" in kinds


def _check_memory(
    cfg: dict[str, Any],
    names: Names,
    info: CheckpointInfo,
    layers: int,
    hidden: int,
    shape_of: dict[str, tuple[int, ...]],
    problems: Problems,
    retriever: tuple[int, int, int, bool] | None,
) -> None:
    mem = names.memory
    _flag(cfg, "add_bos_embedding", "bos_embedding" in mem, "bos_embedding", problems)
    for name, want in (("bos_embedding", (layers, 1, hidden)), ("new_memory_positional_emb", (1, 1, hidden))):
        if name in mem and shape_of[name] != want:
            problems.shapes.append(f"{name} {shape_of[name]}, expected {want}")
    if info.source != "output" and (mem or names.ltm):
        problems.contradictions.append(
            f"source is {info.source!r}, but {sorted([*mem, *names.ltm.values()])} are output-source memory weights"
        )
        return
    pool = info.memory_config.pool_size
    if "memory" in mem:
        shape = shape_of["memory"]
        if len(shape) != 3 or shape[0] != layers or shape[2] != hidden:
            problems.shapes.append(f"memory {shape}, expected ({layers}, N, {hidden})")
        elif info.published and shape[1] != pool:
            problems.contradictions.append(f"memory holds {shape[1]} tokens per layer but the config's pool is {pool}")
        elif shape[1] > pool:
            problems.contradictions.append(f"memory holds {shape[1]} tokens per layer, more than pool_size={pool}")
    if not names.ltm:
        return
    if "memory" not in mem:
        problems.missing.append("memory (a shipped long-term store needs the short-term memory it came with)")
    if info.memory_config.ltm_max_tokens == 0:
        problems.contradictions.append("the config keeps no long-term memory (no num_ltm_blocks) but ltm.* is shipped")
    sizes: set[int] = set()
    required = ("ltm", "ltm_recall_frequencies", "ltm_ages")
    has_keys = any(kind == "ltm_keys" for kind, _ in names.ltm)
    kinds = (*required, "ltm_keys") if has_keys else required
    for layer in range(layers):
        for kind in kinds:
            found = names.ltm.get((kind, layer))
            if found is None:
                problems.missing.append(f"{kind}.{layer}")
                continue
            shape = shape_of[found]
            if kind == "ltm":
                if len(shape) != 2 or shape[1] != hidden:
                    problems.shapes.append(f"{found} {shape}, expected (M, {hidden})")
                else:
                    sizes.add(shape[0])
            elif kind == "ltm_keys":
                width = retriever[2] if retriever is not None else None
                if retriever is None:
                    problems.contradictions.append(f"{found} is shipped but there is no key_proj to score against it")
                elif len(shape) != 2 or shape[1] != width:
                    problems.shapes.append(f"{found} {shape}, expected (M, {width})")
            elif len(shape) != 1:
                problems.shapes.append(f"{found} {shape}, expected (M,)")
    problems.unexpected.extend(n for (_, layer), n in names.ltm.items() if layer >= layers)
    if len(sizes) > 1:
        problems.shapes.append(f"ltm.* hold different sizes per layer {sorted(sizes)}; every layer must hold the same")
    rows = next(iter(sizes)) if len(sizes) == 1 else None
    for (kind, layer), name in names.ltm.items():
        if kind != "ltm" and layer < layers and rows is not None and shape_of[name] and shape_of[name][0] != rows:
            problems.shapes.append(f"{name} has {shape_of[name][0]} rows, ltm.{layer} has {rows}")


def _read(files: dict[str, Path], names: Names, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor: weights in `dtype` on `device`, one at a time (an 8B model never sits in CPU RAM twice);
    the shipped memory on the CPU exactly as stored (converted per memory config later, ages and recall
    counters never through a lower precision)."""
    from safetensors import safe_open

    keep_as_stored = {"memory", *names.ltm.values()}
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        if name not in layout.IGNORED:
            by_file.setdefault(file, []).append(name)
    for file, wanted in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in wanted:
                t = f.get_tensor(name)
                if name not in keep_as_stored:
                    t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                out[name] = t
    return out


def _shipped(info: CheckpointInfo, tensors: dict[str, torch.Tensor], names: Names, layers: int) -> ShippedMemory:
    def stack(kind: str) -> torch.Tensor | None:
        if not any(k == kind for k, _ in names.ltm):
            return None
        return torch.stack([tensors[names.ltm[(kind, layer)]] for layer in range(layers)])

    ltm = stack("ltm")
    ages, rf = stack("ltm_ages"), stack("ltm_recall_frequencies")
    return ShippedMemory(
        source=info.source,
        pool=tensors["memory"],
        ltm=ltm,
        ltm_keys=stack("ltm_keys"),
        ltm_ages=ages.to(torch.int64) if ages is not None else None,
        ltm_rf=rf.to(torch.float32) if rf is not None else None,
    )


def _fresh_rotary(model: Any, device: torch.device, round_to: torch.dtype | None) -> None:
    """Rebuild the rotary module (its `inv_freq` is a non-persistent buffer left on the meta device).

    For published checkpoints in bf16/fp16 the buffer is rounded to that dtype, as the release's loading
    recipe does by casting the whole model (SPEC 2.4, 9.5.9); cos/sin are still computed in fp32 from it.
    """
    rotary = model.model.rotary_emb
    fresh = type(rotary)(config=model.config).to(device)
    if round_to is not None and round_to in (torch.bfloat16, torch.float16):
        fresh.inv_freq = fresh.inv_freq.to(round_to)
    model.model.rotary_emb = fresh


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"{path} holds no usable tokenizer files ({err}); copy the base model's tokenizer there or pass tokenizer="
        ) from err
