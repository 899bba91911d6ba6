"""Retrieval latency per layer against long-term size (issue 7, item 5a): exact torch vs shortlist indexes.

One layer of SmolLM2 key geometry (3 KV heads x 64 = 192-dim pre-RoPE keys, 9 query heads), a prompt of
~25 query tokens, top-1,024 tokens in blocks of 64 (`per_layer` selection, `exact=True`), scorer `max_z`
(the default) and optionally `sigmoid_mean` (M+). Keys are real: one forward pass of SmolLM2 over ~2k tokens of
chat filler gives a layer's keys and the question's queries; a store of N tokens is made of runs of 64
consecutive real keys (a block is one stretch of text) plus Gaussian noise (0.3 x each dimension's std), so
no two stored keys are equal while the geometry (anisotropy, clusters) stays the model's.

Every variant runs in the same process, interleaved, on the same store and four questions; each figure is
also given as a ratio to exact torch, and the recall of each variant is the fraction of the exact selection it
returns (mean and worst over the questions; `identical`: the same tokens in the same order for all four).
On a CPU shared with other jobs pass `--threads 1`: two contended OpenMP threads make every figure noisy.
Variants: exact torch fp32 (the reference), exact torch on bf16 and on int8 keys (other stores), the proven int8
scan (`ltm_index="scan"`) over each of the three stores, proven torch shortlist, proven faiss flat shortlist,
faiss IVF (approximate; sqrt(N) lists, `--nprobe` of them searched; one index serves every nprobe). Build times
(first construction and first read: int8 scan copy, faiss copy, IVF training, the key statistics of `max_z`)
are reported separately. `identical` compares
with the exact selection over the same stored keys.

    python benchmarks/retrieval_bench.py                       # 10k, 100k, 1M
    python benchmarks/retrieval_bench.py --sizes 10000 100000 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import RESULTS, print_table, write_csv, write_json  # noqa: E402
from conversation import filler_turns  # noqa: E402

from mplus_agents import MPlusLLM, quant  # noqa: E402
from mplus_agents.hf.hooks import capture_kv, layer_hooks  # noqa: E402
from mplus_agents.index import (  # noqa: E402
    ExactIndex,
    FaissIndex,
    LayerCandidates,
    ScanIndex,
    ShortlistIndex,
    approximate_shared_select,
    clear_cache,
)
from mplus_agents.retrieval import select_tokens  # noqa: E402

QUESTIONS = [
    "By the way, what did I tell you the code for my bike locker at the station was?",
    "Which city did I say my sister moved to last spring, and what does she do there?",
    "Remind me: what was the name of the dog we talked about, and what breed is it?",
    "What time did I say the dentist appointment is on Thursday?",
]


OWN_REFERENCE = {
    "proven int8 scan, bf16 keys": "exact torch bf16 keys",
    "proven int8 scan, int8 keys": "exact torch int8 keys",
}
"""`identical` compares a variant with the exact selection over the same stored keys (a bf16 or int8 store is
another set of keys; its recall against the fp32 selection measures the storage, not the index)."""


def real_keys_and_queries(
    layers: list[int], text_tokens: int
) -> dict[int, tuple[torch.Tensor, list[torch.Tensor]]]:
    """Per layer: [n, kv, hd] pre-RoPE keys of chat filler and [T, heads, hd] pre-RoPE queries of each question.

    Each question is read after the filler (its queries see the text, as at a real read).
    """
    llm = MPlusLLM.from_default()
    turns = filler_turns(0, [])
    ids: list[int] = []
    while len(ids) < text_tokens:
        ids += llm.encode("user: " + next(turns) + "\n")
    ids = ids[:text_tokens]
    seen: dict[int, torch.Tensor] = {}

    def pre(index: int, hidden: torch.Tensor) -> None:
        if index in layers:
            seen[index] = hidden

    with torch.no_grad(), capture_kv(llm.engine.arch) as (keys, _), layer_hooks(llm.engine.arch, pre=pre):
        cache = DynamicCache()
        llm.engine.forward(cache, torch.tensor(ids), 0)
    queries: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for text in QUESTIONS:
        question = llm.encode(text)
        with torch.no_grad(), layer_hooks(llm.engine.arch, pre=pre):
            llm.engine.forward(copy.deepcopy(cache), torch.tensor(question), len(ids))
            for layer in layers:
                q = llm.engine._queries(layer, seen[layer], torch.arange(len(question)), "max_z")
                queries[layer].append(q.float().contiguous())
    return {layer: (keys[layer].float().contiguous(), queries[layer]) for layer in layers}  # type: ignore[index, union-attr]


def synth_store(real: torch.Tensor, n: int, block: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    runs = (n + block - 1) // block
    starts = torch.randint(0, real.shape[0] - block, (runs,), generator=g)
    idx = (starts[:, None] + torch.arange(block)[None, :]).reshape(-1)[:n]
    noise_scale = 0.3 * real.reshape(real.shape[0], -1).std(0).reshape(1, *real.shape[1:])
    out = real[idx]
    for lo in range(0, n, 262144):  # in place, in slices: no second full-size temporary
        hi = min(n, lo + 262144)
        out[lo:hi] += torch.randn(hi - lo, *real.shape[1:], generator=g) * noise_scale
    return out


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--scorers", nargs="+", default=["max_z"])
    parser.add_argument("--text-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: torch's)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64], help="IVF lists probed")
    parser.add_argument("--shared-layers", type=int, nargs="*", default=[],
                        help="also time a `shared` selection over these scoring layers (exact vs IVF)")
    parser.add_argument("--no-faiss-flat", action="store_true", help="skip the faiss flat copy (saves RAM)")
    parser.add_argument("--out", default="retrieval_bench")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
        import faiss

        faiss.omp_set_num_threads(args.threads)
    load_before = os.getloadavg()

    per_layer = real_keys_and_queries(sorted({args.layer, *args.shared_layers}), args.text_tokens)
    real, queries = per_layer[args.layer]
    shapes = [tuple(q.shape) for q in queries]
    print(f"real keys {tuple(real.shape)}, queries {shapes}, torch threads {torch.get_num_threads()}")
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        clear_cache()
        gc.collect()
        keys = synth_store(real, n, args.block_size, seed=n)
        block = torch.arange(n) // args.block_size
        age = torch.arange(n - 1, -1, -1)
        cand = LayerCandidates([keys], block, age)
        cand16 = LayerCandidates([keys.to(torch.bfloat16)], block, age)
        k8, s8 = quant.quantize(keys)
        cand8 = LayerCandidates([k8], block, age, [s8])
        variants: dict[str, Any] = {
            "exact torch fp32": partial(ExactIndex, cand),
            "exact torch bf16 keys": partial(ExactIndex, cand16),
            "exact torch int8 keys": partial(ExactIndex, cand8),
            "proven int8 scan": partial(ScanIndex, cand),
            "proven int8 scan, bf16 keys": partial(ScanIndex, cand16),
            "proven int8 scan, int8 keys": partial(ScanIndex, cand8),
            "proven torch shortlist": partial(ShortlistIndex, cand, "torch"),
            **{f"faiss IVF nprobe {p}": partial(FaissIndex, cand, "ivf", nprobe=p) for p in args.nprobe},
        }
        if not args.no_faiss_flat:
            variants["proven faiss flat shortlist"] = partial(FaissIndex, cand, "flat")
        build: dict[str, float] = {}
        indexes: dict[str, Any] = {}
        for name, make in variants.items():  # first construction builds (and caches) the backend
            build[name], indexes[name] = timed(make)
            # The first read also computes what later reads reuse (max_z key statistics over the store): build.
            build[name] += timed(partial(indexes[name].select, queries[0], args.scorers[0], args.budget, exact=True))[0]
        for scorer in args.scorers:
            times: dict[str, list[float]] = {name: [] for name in variants}
            fallbacks = dict.fromkeys(variants, 0)
            results: dict[tuple[str, int], torch.Tensor] = {}
            for _ in range(args.repeats):
                for qi, q in enumerate(queries):
                    for name in variants:  # interleaved
                        index = variants[name]()  # per read, as the engine does: a cache lookup, not a rebuild
                        ms, got = timed(partial(index.select, q, scorer, args.budget, exact=True))
                        times[name].append(ms)
                        results[name, qi] = got
                        fallbacks[name] += getattr(index, "fallbacks", 0)  # exact answers after a failed proof
            base = statistics.median(times["exact torch fp32"])
            for name in variants:
                med = statistics.median(times[name])
                recalls, same = [], True
                own = OWN_REFERENCE.get(name, "exact torch fp32")
                for qi in range(len(queries)):
                    want = results["exact torch fp32", qi]
                    recalls.append(len(set(want.tolist()) & set(results[name, qi].tolist())) / want.numel())
                    same = same and torch.equal(results[name, qi], results[own, qi])
                rows.append({
                    "tokens": n,
                    "scorer": scorer,
                    "variant": name,
                    "ms_median": round(med, 2),
                    "ms_min": round(min(times[name]), 2),
                    "ms_max": round(max(times[name]), 2),
                    "ratio_to_exact": round(med / base, 3),
                    "recall": round(statistics.mean(recalls), 4),
                    "recall_min": round(min(recalls), 4),
                    "identical": same,
                    "identical_to": own,
                    "build_ms": round(build[name], 1),
                    "fallbacks": fallbacks[name],
                })
                print(rows[-1], flush=True)
        indexes.clear()
        variants.clear()
        if args.shared_layers:
            rows += bench_shared(args, per_layer, n)
    header = ["tokens", "scorer", "variant", "ms/layer (median)", "worst read", "x exact", "recall (mean/min)",
              "identical", "build ms"]
    table = [[r["tokens"], r["scorer"], r["variant"], r["ms_median"], r.get("ms_max", ""), r["ratio_to_exact"],
              f"{r['recall']}/{r['recall_min']}", r["identical"], r["build_ms"]] for r in rows]
    print()
    print_table(header, table)
    write_csv(RESULTS / f"{args.out}.csv", rows)
    info = {"argv": sys.argv, "threads": torch.get_num_threads(), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    write_json(RESULTS / f"{args.out}.json", info)
    print(f"load average before {load_before}, after {os.getloadavg()} (2 cores shared)")
    plot(rows, RESULTS / f"{args.out}.png")


def bench_shared(
    args: argparse.Namespace, per_layer: dict[int, tuple[torch.Tensor, list[torch.Tensor]]], n: int
) -> list[dict[str, Any]]:
    """The engine's `shared` selection over several scoring layers: exact (every token of every layer, summed
    standardised scores) against `approximate_shared_select` on IVF indexes. Same runs of real keys per layer
    (one synthetic store, several layers), so a block means the same text in every layer."""
    clear_cache()
    gc.collect()
    layers = list(args.shared_layers)
    block = torch.arange(n) // args.block_size
    age = torch.arange(n - 1, -1, -1)
    cands = {layer: LayerCandidates([synth_store(per_layer[layer][0], n, args.block_size, seed=n)], block, age)
             for layer in layers}
    nq = len(QUESTIONS)

    def exact(qi: int) -> torch.Tensor:
        total = torch.zeros(n)
        for layer in layers:
            s = ExactIndex(cands[layer]).scores(per_layer[layer][1][qi], "max_z")
            total += (s - s.mean()) / (s.std() + 1e-6)
        return select_tokens(total, block, age, args.budget, exact=False)

    def ivf(nprobe: int, qi: int) -> torch.Tensor | None:
        indexes: dict[int, ShortlistIndex] = {layer: FaissIndex(cands[layer], "ivf", nprobe=nprobe) for layer in layers}
        queries = {layer: per_layer[layer][1][qi] for layer in layers}
        return approximate_shared_select(indexes, queries, "max_z", args.budget)

    build, _ = timed(partial(ivf, args.nprobe[0], 0))
    variants: dict[str, Any] = {f"shared exact ({len(layers)} layers)": exact}
    variants.update({f"shared faiss IVF nprobe {p} ({len(layers)} layers)": partial(ivf, p) for p in args.nprobe})
    times: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[tuple[str, int], torch.Tensor | None] = {}
    for _ in range(args.repeats):
        for qi in range(nq):
            for name, fn in variants.items():
                ms, results[name, qi] = timed(partial(fn, qi))
                times[name].append(ms)
    base = statistics.median(times[next(iter(variants))])
    rows = []
    for name in variants:
        recalls, same = [], True
        for qi in range(nq):
            want, got = results[next(iter(variants)), qi], results[name, qi]
            assert want is not None
            got_list = [] if got is None else got.tolist()
            recalls.append(len(set(want.tolist()) & set(got_list)) / want.numel())
            same = same and got is not None and torch.equal(got, want)
        med = statistics.median(times[name])
        rows.append({
            "tokens": n, "scorer": "max_z", "variant": name, "ms_median": round(med, 2),
            "ms_min": round(min(times[name]), 2), "ratio_to_exact": round(med / base, 3),
            "recall": round(statistics.mean(recalls), 4), "recall_min": round(min(recalls), 4), "identical": same,
            "build_ms": round(build, 1) if "IVF" in name else 0.0, "fallbacks": 0,
        })
        print(rows[-1], flush=True)
    cands.clear()
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for scorer in sorted({r["scorer"] for r in rows}):
        for name in dict.fromkeys(r["variant"] for r in rows):
            pts = [(r["tokens"], r["ms_median"]) for r in rows if r["variant"] == name and r["scorer"] == scorer]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{name} ({scorer})")
    ax.axhline(20, color="grey", linestyle="--", linewidth=1, label="target 20 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("long-term tokens per layer")
    ax.set_ylabel("ms per layer (median)")
    ax.set_title("Long-term retrieval, one SmolLM2 layer, top-1024 in blocks of 64")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
