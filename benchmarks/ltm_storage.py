"""Long-term storage dtypes (issue 7 item 2): what float32 / bfloat16 / int8 cost in RAM, in retrieval time, and
in recall.

Two parts, both writing CSV under `benchmarks/results/`:

- `recall`: gathers the recall benchmark runs made with `recall.py --ltm-dtype X --tag ltm_X` (same seed, same
  facts, same lengths) into `ltm_dtype_recall.csv`: hits, how often the fact's block was read, long-term store
  bytes, and how many replies are word-for-word the float32 run's.
- `scoring` (default): times the read path's storage-dependent work on random stores with SmolLM2's shapes
  (3 KV heads x 64, 9 query heads): `max_z` scoring of the long-term store in the five auto score layers, then
  gathering 1,024 rows of K and V in all 30 layers, as `Candidates` does. Only the five scored layers are
  built (the gathers of the other 25 layers repeat on them), which keeps 160k tokens within a few GB. The
  dtypes run interleaved in one process, repeated, and each figure is printed as a ratio to float32 measured
  in the same rounds.

Run with one thread and `nice` on a shared machine:
`OMP_NUM_THREADS=1 nice -n 10 python benchmarks/ltm_storage.py --sizes 16000 160000`.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, print_table, write_csv

from mplus_agents.retrieval import head_mean_logits, max_standardized
from mplus_agents.state import TokenStore

DTYPES = ("float32", "bfloat16", "int8")
LAYERS, KV_HEADS, HEAD_DIM, HEADS = 30, 3, 64, 9
SCORE_LAYERS = 5
"""The stores hold only the scored layers; bytes are reported per token and layer and scaled to LAYERS."""


def recall_summary(results: Path, prefix: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    answers: dict[str, list[dict[str, str]]] = {}
    for dt in DTYPES:
        tag = f"{prefix}_{dt}"
        path = results / f"recall_{tag}.json"
        if not path.exists():
            print(f"missing {path}: run recall.py --ltm-dtype {dt} --tag {tag} first")
            continue
        info = json.loads(path.read_text())
        with open(results / f"recall_{tag}.csv") as f:
            cells = list(csv.DictReader(f))
        with open(results / f"recall_answers_{tag}.csv") as f:
            answers[dt] = list(csv.DictReader(f))
        for inj in info["injection"]:
            length = inj["length"]

            def cell(name: str, length: int = length, cells: list[dict[str, str]] = cells) -> str:
                return next(c["cell"] for c in cells if c["row"] == name and int(c["length"]) == length)

            rows.append(
                dict(
                    ltm_dtype=dt,
                    scorer=info["memory_config"]["scorer"],
                    retrieve_tokens=info["memory_config"]["retrieve_tokens"],
                    history_tokens=inj["history_tokens"],
                    hits=cell("latent"),
                    fact_read=cell("latent: fact tokens read (pool or retrieved)"),
                    long_term_tokens=inj["long_term_tokens"],
                    ltm_bytes=inj.get("ltm_bytes"),
                    state_bytes=inj["memory_bytes"],
                    threads=info.get("threads"),
                )
            )
    base = {r["history_tokens"]: r for r in rows if r["ltm_dtype"] == "float32"}
    for r in rows:
        ref = base.get(r["history_tokens"])
        if ref and ref["ltm_bytes"] and r["ltm_bytes"]:
            r["ltm_bytes_vs_float32"] = round(r["ltm_bytes"] / ref["ltm_bytes"], 3)
        if "float32" in answers and r["ltm_dtype"] in answers:
            pairs = zip(answers["float32"], answers[r["ltm_dtype"]], strict=True)
            same = sum(a["reply"] == b["reply"] for a, b in pairs)
            r["replies_identical_to_float32"] = f"{same}/{len(answers['float32'])}"
    return rows


def make_store(n: int, dtype: str, seed: int) -> TokenStore:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(SCORE_LAYERS, n, KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(SCORE_LAYERS, n, KV_HEADS, HEAD_DIM, generator=g)
    zeros = torch.zeros(SCORE_LAYERS, n, dtype=torch.int64)
    return TokenStore(k=k, v=v, age=zeros, block=zeros.clone()).to(dtype=getattr(torch, dtype))


def read_work(store: TokenStore, q: torch.Tensor, rows: torch.Tensor) -> float:
    """Seconds for what a shared-selection read does with the store: score 5 layers, gather rows in all."""
    t0 = time.perf_counter()
    total = torch.zeros(len(store))
    for layer in range(SCORE_LAYERS):
        s = max_standardized(head_mean_logits(q, store.k[layer], store.scale("k", layer)))
        total += (s - s.mean()) / (s.std() + 1e-6)
    for layer in range(LAYERS):
        store.rows("k", layer % SCORE_LAYERS, rows, torch.float32)
        store.rows("v", layer % SCORE_LAYERS, rows, torch.float32)
    return time.perf_counter() - t0


def scoring(sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(1)
    q = torch.randn(16, HEADS, HEAD_DIM, generator=g)
    for n in sizes:
        stores = {dt: make_store(n, dt, 0) for dt in DTYPES}
        rows = torch.randperm(n, generator=g)[:1024].sort().values
        times: dict[str, list[float]] = {dt: [] for dt in DTYPES}
        for dt in DTYPES:  # warm-up
            read_work(stores[dt], q, rows)
        for _ in range(repeats):
            for dt in DTYPES:  # interleaved, so drift in machine load hits every dtype alike
                times[dt].append(read_work(stores[dt], q, rows))
        base = statistics.median(times["float32"])
        for dt in DTYPES:
            st = stores[dt]
            nbytes = sum(t.numel() * t.element_size() for t in st.tensors().values())
            med = statistics.median(times[dt])
            out.append(
                dict(
                    tokens_per_layer=n, ltm_dtype=dt, ltm_bytes_30_layers=nbytes * LAYERS // SCORE_LAYERS,
                    bytes_per_token_layer=round(nbytes / (n * SCORE_LAYERS), 1),
                    read_ms_median=round(1000 * med, 2), read_ms_min=round(1000 * min(times[dt]), 2),
                    time_vs_float32=round(med / base, 3), repeats=repeats, threads=torch.get_num_threads(),
                )
            )
        del stores
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", nargs="?", choices=("scoring", "recall"), default="scoring")
    p.add_argument("--sizes", type=int, nargs="+", default=[16000, 160000], help="long-term tokens per layer")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--prefix", default="ltm", help="recall: runs tagged PREFIX_float32, PREFIX_bfloat16, PREFIX_int8")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "recall":
        rows = recall_summary(args.out, args.prefix)
        path = args.out / ("ltm_dtype_recall.csv" if args.prefix == "ltm" else f"ltm_dtype_recall_{args.prefix}.csv")
    else:
        rows = scoring(args.sizes, args.repeats)
        path = args.out / "ltm_scoring.csv"
    if rows:
        header = list(rows[0])
        print_table(header, [[r.get(h, "") for h in header] for r in rows])
        write_csv(path, rows)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
