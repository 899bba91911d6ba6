"""`mplus train`: co-train the retriever of a frozen model on the user's text (SPEC 5.1-5.3), resumably.

Two phases. `collect` runs the model once through a real memory and caches query features, candidate
token ids, labels and every memory token's key features (the model's hidden states are detached in M+, so
nothing else is needed). Then only the projectors train, with AdamW at the retriever's own learning rate, on
batches of cached queries: a random-length prefix of each query's tokens (SPEC 4.5
`random_retriever_length`), every relevant token and a sample of the others, and SPEC 5.3's balanced
cross-entropy over all (layer, token) pairs of the batch. A step costs milliseconds, so thousands of
steps fit in minutes on a CPU; the model forward of the collection phase dominates.

The output directory holds `train_state/` while a run is in progress: `run.json` (what the run is: files'
hashes, options, memory config, model), `features.safetensors` (the collection) and
`checkpoint.safetensors` (projectors, optimizer, step and the sampling RNG, written atomically every
`save_every` steps). A resumed run continues from the last checkpoint and ends bit-identical to an
uninterrupted one. At the end the directory gets `retriever.safetensors` and a full checkpoint that
`MPlusLLM.from_pretrained` loads with `scorer="retriever"`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mplus_agents.config import MemoryConfig
from mplus_agents.errors import InvalidInputError
from mplus_agents.model import MPlusLLM
from mplus_agents.retrieval import head_mean_logits, max_standardized, select_tokens
from mplus_agents.retriever import Retriever
from mplus_agents.training.collect import QUESTION, Collected, CollectOptions, collect
from mplus_agents.training.data import Document, read_files
from mplus_agents.training.io import attach_retriever, save_retriever, save_trained
from mplus_agents.training.loss import balanced_bce, retriever_weights

STATE_DIR = "train_state"
FORMAT = 1


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 400
    lr: float = 1e-4
    """The retriever's own learning rate (SPEC 5.5: 1e-4, a separate AdamW group)."""
    weight_decay: float = 0.01
    batch: int = 8
    """Queries per step."""
    negatives: int = 512
    """Non-relevant candidates sampled per query and layer (the loss's negative mean is over a sample)."""
    max_positives: int = 256
    lambda_neg: float = 1.0
    random_prefix: bool = True
    dim: int = 256
    """Projector output width (SPEC: 256; the hidden width is 2*dim)."""
    save_every: int = 100
    seed: int = 0


@dataclass
class TrainResult:
    path: Path
    steps: int
    losses: list[float]
    seconds_collect: float
    seconds_train: float
    examples: int
    memory_tokens: int
    resumed_from: int = 0
    interrupted: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)


def trained_layers(config: MemoryConfig, layers: int) -> tuple[int, ...]:
    """The layers whose projectors score retrieval under `config` (all of them for per-layer selection)."""
    if config.selection == "per_layer":
        return tuple(range(layers))
    return config.scoring_layers(layers)


def new_retriever(llm: MPlusLLM, config: MemoryConfig, dim: int, seed: int) -> Retriever:
    s = llm.engine.arch.shapes
    key_dim, key_input = (s.hidden_size, "hidden") if config.source == "output" else (2 * s.kv_heads * s.head_dim, "kv")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Retriever(s.layers, s.hidden_size, key_dim, dim, key_input=key_input)  # type: ignore[arg-type]


def _params(retriever: Retriever, layers: Sequence[int]) -> list[torch.nn.Parameter]:
    mods = [m for layer in layers for m in (retriever.query_proj[layer], retriever.key_proj[layer])]
    return [p for m in mods for p in m.parameters()]


# ---------------------------------------------------------------------------------------------- one step


def batch_loss(
    retriever: Retriever, data: Collected, examples: Sequence[int], gen: torch.Generator, opts: TrainOptions
) -> torch.Tensor:
    """SPEC 5.3 over a batch: every trained layer, each query's relevant tokens and sampled others."""
    ws: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for e in examples:
        q_all = data.queries(e)
        t = q_all.shape[1]
        prefix = int(torch.randint(1, t + 1, (1,), generator=gen)) if opts.random_prefix else t
        ids, _ = data.candidates(e)
        for li, layer in enumerate(data.layers):
            y = data.labels(e, ids[li])
            pos = ids[li][y > 0.5]
            neg = ids[li][y <= 0.5]
            if pos.numel() > opts.max_positives:
                pos = pos[torch.randperm(pos.numel(), generator=gen)[: opts.max_positives]]
            if neg.numel() > opts.negatives:
                neg = neg[torch.randperm(neg.numel(), generator=gen)[: opts.negatives]]
            chosen = torch.cat([pos, neg])
            q = retriever.queries(layer, q_all[li, :prefix])
            k = retriever.keys(layer, data.keys[li, chosen])
            ws.append(retriever_weights(q, k))
            ys.append(torch.cat([torch.ones(pos.numel()), torch.zeros(neg.numel())]))
    return balanced_bce(torch.cat(ws), torch.cat(ys), opts.lambda_neg)


# ---------------------------------------------------------------------------------------------- evaluation


def candidate_scores(
    method: str, llm: MPlusLLM | None, retriever: Retriever | None, data: Collected, e: int, source: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores [Ltr, n], ids [Ltr, n], labels [Ltr, n]) over example e's retrievable candidates."""
    ids, retr = data.candidates(e)
    keep = retr[0]
    ids = ids[:, keep]
    labels = torch.stack([data.labels(e, ids[li]) for li in range(len(data.layers))])
    q_all = data.queries(e)
    rows = []
    with torch.no_grad():
        for li, layer in enumerate(data.layers):
            feats = data.keys[li, ids[li]]
            if method == "retriever":
                assert retriever is not None
                rows.append(retriever_weights(retriever.queries(layer, q_all[li]), retriever.keys(layer, feats)))
            elif method == "max_z":
                assert llm is not None
                arch = llm.engine.arch
                dt = arch.dtype
                q = arch.q_from_normed(layer, q_all[li].to(arch.device, dt))
                k = _model_keys(llm, layer, feats.to(arch.device, dt), source)
                rows.append(max_standardized(head_mean_logits(q, k)).cpu())
            else:
                raise ValueError(f"unknown method {method!r}")
    return torch.stack(rows).float(), ids, labels


def _model_keys(llm: MPlusLLM, layer: int, feats: torch.Tensor, source: str) -> torch.Tensor:
    s = llm.engine.arch.shapes
    if source == "input":  # kv_features: [k flattened, v flattened]
        return feats[:, : s.kv_heads * s.head_dim].reshape(-1, s.kv_heads, s.head_dim)
    attn = llm.engine.arch.layers[layer].self_attn
    k = attn.k_proj(feats).reshape(-1, s.kv_heads, s.head_dim)
    return attn.k_norm(k) if getattr(attn, "k_norm", None) is not None else k


def evaluate(
    data: Collected,
    config: MemoryConfig,
    *,
    llm: MPlusLLM | None = None,
    retriever: Retriever | None = None,
    methods: Sequence[str] = ("retriever", "max_z"),
    kinds: Sequence[int] = (QUESTION,),
) -> dict[str, Any]:
    """Precision at selecting the relevant memory tokens among the retrievable ones (SPEC 8.4's ~30% vs 3%).

    Per query, layers' scores are combined as the shared read combines them (each layer standardised, then
    summed) and the read's block selection picks `retrieve_tokens`. Reported: R-precision (fraction of the
    top-|relevant| tokens that are relevant), its chance level |relevant|/n, the selected tokens' precision,
    and how often any relevant token is selected ("read").
    """
    out: dict[str, Any] = {}
    chosen = [e for e in range(len(data)) if int(data.kind[e]) in kinds]
    for method in methods:
        rp, chance, sel_prec, read, used = 0.0, 0.0, 0.0, 0, 0
        for e in chosen:
            scores, ids, labels = candidate_scores(method, llm, retriever, data, e, config.source)
            if scores.shape[1] == 0 or not bool(labels[0].any()):
                continue
            z = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-6)
            total = z.sum(0)
            y = labels[0]
            npos = int(y.sum())
            rp += float(y[total.topk(npos).indices].mean())
            chance += npos / y.numel()
            age = int(data.written[e]) - 1 - ids[0]
            picked = select_tokens(total, data.block[ids[0]], age, config.retrieve_tokens, exact=False)
            sel_prec += float(y[picked].mean()) if picked.numel() else 0.0
            read += int(bool(y[picked].any()))
            used += 1
        if used:
            out[method] = dict(
                queries=used,
                r_precision=rp / used,
                chance=chance / used,
                selected_precision=sel_prec / used,
                read=read,
            )
    return out


# ---------------------------------------------------------------------------------------------- run directory


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_identity(
    files: Sequence[Path], config: MemoryConfig, copts: CollectOptions, topts: TrainOptions, model_name: str
) -> dict[str, Any]:
    """What makes two runs the same run (the step count may grow between resumes; nothing else may change)."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(Path(f).read_bytes())
        digest.update(b"\x00")
    return dict(
        format=FORMAT,
        data_sha256=digest.hexdigest(),
        memory_config=json.loads(config.to_json()),
        collect=json.loads(json.dumps(dataclasses.asdict(copts))),
        train={k: v for k, v in dataclasses.asdict(topts).items() if k not in ("steps", "save_every")},
        model=model_name,
    )


def _save_checkpoint(path: Path, retriever: Retriever, opt: torch.optim.Optimizer, step: int, gen: torch.Generator,
                     losses: list[float]) -> None:
    tensors = {f"retriever.{k}": v.detach().clone() for k, v in retriever.state_dict().items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"opt.{idx}.{name}"] = value.detach().clone() if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng"] = gen.get_state()
    meta = {"step": str(step), "param_groups": json.dumps(sd["param_groups"]), "losses": json.dumps(losses)}
    _atomic_save(tensors, path, meta)


def _load_checkpoint(path: Path, retriever: Retriever, opt: torch.optim.Optimizer, gen: torch.Generator
                     ) -> tuple[int, list[float]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    retriever.load_state_dict({k[len("retriever."):]: v for k, v in tensors.items() if k.startswith("retriever.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    gen.set_state(tensors["rng"])
    return int(meta["step"]), json.loads(meta.get("losses", "[]"))


def _prepare_dir(out: Path, identity: dict[str, Any], resume: bool) -> Path:
    """Refuse to mix runs: a directory with another run, a checkpoint, or a finished run is an error."""
    state_dir = out / STATE_DIR
    run_file = state_dir / "run.json"
    if run_file.exists():
        saved = json.loads(run_file.read_text())
        if saved.get("identity") != identity:
            raise InvalidInputError(
                f"{out} holds another training run (different data, options or model); choose a new output "
                "directory or delete it"
            )
        if not resume:
            raise InvalidInputError(
                f"{out} holds an unfinished run of the same training; pass --resume to continue it from its last "
                "checkpoint, or choose a new output directory"
            )
        return state_dir
    if out.exists() and any(out.iterdir()):
        what = "a finished run or a checkpoint" if (out / "config.json").exists() else "other files"
        raise InvalidInputError(f"{out} already holds {what}; choose a new (or empty) output directory")
    if resume:
        raise InvalidInputError(f"nothing to resume in {out}: it holds no training run")
    state_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"identity": identity}, indent=2, sort_keys=True))
    return state_dir


ProgressFn = Callable[[str, int, int, float | None], None]


def train(
    llm: MPlusLLM,
    files: Sequence[str | Path],
    out: str | Path,
    *,
    config: MemoryConfig | None = None,
    collect_options: CollectOptions | None = None,
    options: TrainOptions | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    stop_after: int | None = None,
    base_model: str | None = None,
) -> TrainResult:
    """Train a retriever for `llm` on `files` and write it to `out` (see the module docstring).

    `stop_after` ends the run after that many steps of this call, as an interruption would (tests use it).
    """
    opts = options or TrainOptions()
    if opts.steps < 1 or opts.batch < 1 or opts.save_every < 1 or opts.lr <= 0:
        raise InvalidInputError("steps, batch and save_every must be >= 1 and lr > 0")
    cfg = config or llm.config
    layers = trained_layers(cfg, llm.engine.arch.shapes.layers)
    copts = collect_options or CollectOptions(layers=layers, seed=opts.seed)
    if tuple(copts.layers) != tuple(layers):
        copts = dataclasses.replace(copts, layers=layers)
    paths = [Path(f) for f in files]
    docs: list[Document] = read_files(paths)
    out = Path(out)
    name = base_model or llm.name
    identity = run_identity(paths, cfg, copts, opts, name)
    state_dir = _prepare_dir(out, identity, resume)

    t0 = time.perf_counter()
    features = state_dir / "features.safetensors"
    if features.exists():
        data = Collected.from_tensors(load_file(str(features)))
    else:
        def collect_progress(done: int, total: int) -> None:
            if progress is not None:
                progress("collect", done, total, None)

        data = collect(llm, docs, cfg, copts, progress=collect_progress)
        if len(data) == 0:
            raise InvalidInputError(
                f"too little text for one training step: {sum(len(d.segments) for d in docs)} segments gave no "
                "query (need documents of several lines, or `Q: ` questions after some turns)"
            )
        _atomic_save(data.tensors(), features)
    seconds_collect = time.perf_counter() - t0

    retriever = new_retriever(llm, cfg, opts.dim, opts.seed)
    params = _params(retriever, layers)
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    gen = torch.Generator().manual_seed(opts.seed)
    step, losses = 0, list[float]()
    ckpt = state_dir / "checkpoint.safetensors"
    if ckpt.exists():
        step, losses = _load_checkpoint(ckpt, retriever, opt, gen)
    resumed_from = step
    t1 = time.perf_counter()
    ran = 0
    interrupted = False
    retriever.train()
    while step < opts.steps:
        if stop_after is not None and ran >= stop_after:
            interrupted = True
            break
        examples = torch.randint(0, len(data), (opts.batch,), generator=gen).tolist()
        loss = batch_loss(retriever, data, examples, gen, opts)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        step += 1
        ran += 1
        losses.append(float(loss.detach()))
        if progress is not None:
            progress("train", step, opts.steps, losses[-1])
        if step % opts.save_every == 0 or step == opts.steps:
            _save_checkpoint(ckpt, retriever, opt, step, gen, losses)
    retriever.eval()
    seconds_train = time.perf_counter() - t1
    result = TrainResult(
        path=out, steps=step, losses=losses, seconds_collect=seconds_collect, seconds_train=seconds_train,
        examples=len(data), memory_tokens=int(data.keys.shape[1]), resumed_from=resumed_from,
        interrupted=interrupted,
    )
    if interrupted:
        return result
    trained_cfg = cfg.replace(scorer="retriever")
    trained = attach_retriever(llm, retriever, trained_cfg)
    meta = dict(memory_config=json.loads(trained_cfg.to_json()), base_model=name, source=cfg.source, steps=step,
                final_loss=_mean_tail(losses))
    save_trained(out, trained)  # replaces the directory (and train_state) as a whole
    save_retriever(out, retriever, list(layers), meta)
    (out / "training.json").write_text(json.dumps(dict(
        identity=identity, steps=step, losses=losses, examples=len(data), memory_tokens=result.memory_tokens,
        seconds_collect=round(seconds_collect, 1), seconds_train=round(seconds_train, 1),
    ), indent=1))
    shutil.rmtree(state_dir, ignore_errors=True)
    return result


def _mean_tail(values: list[float], n: int = 20) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail) if tail else math.nan
