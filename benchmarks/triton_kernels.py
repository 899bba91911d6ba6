"""Triton kernels against the torch paths they replace, on CUDA (issue 7 items 3 and 5).

For each long-term size n (candidates per layer) it times, interleaved in one process, retrieval.py's torch
code (MPLUS_KERNELS=torch) and the fused kernel for the sigmoid_mean, max_logit and max_z scorers, and for the
prompt-over-prefix attention torch SDPA (explicit mask) against the kernel; it prints medians and the ratio
torch / kernel (above 1: the kernel is faster) and writes benchmarks/results/kernels.csv. Shapes follow
SmolLM2-135M (9 query heads, 3 KV heads, head_dim 64) in bf16 unless told otherwise.

Without CUDA there is nothing to time (triton only interprets on CPU); `--smoke` then runs every code path once
at toy sizes under TRITON_INTERPRET=1, so the script itself is checked, and prints no timings.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds for one call, with the device synchronised before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(
    torch_fn: Callable[[], object], kernel_fn: Callable[[], object], device: str, reps: int
) -> tuple[float, float]:
    """Median seconds of each, calls interleaved so both see the same machine state; one warm-up call each."""

    def torch_path() -> object:
        os.environ["MPLUS_KERNELS"] = "torch"
        try:
            return torch_fn()
        finally:
            os.environ.pop("MPLUS_KERNELS", None)

    torch_path()
    kernel_fn()
    a, b = [], []
    for _ in range(reps):
        a.append(timed(torch_path, device))
        b.append(timed(kernel_fn, device))
    return statistics.median(a), statistics.median(b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens for the attention comparison")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="no CUDA: run each path once at toy sizes, no timings")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        if not args.smoke:
            print("no CUDA device: nothing to time (triton only interprets on CPU); --smoke checks the script")
            return 0
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported below
        args.sizes, args.query_tokens, args.prompt, args.reps = [70, 130], 3, 5, 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sys.path.insert(0, str(ROOT))
    from mplus_agents import retrieval
    from mplus_agents.kernels import attention, scoring

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(args.query_tokens, args.heads, args.head_dim, device=device, generator=gen)
    rows: list[dict[str, object]] = []
    for n in args.sizes:
        k = torch.randn(n, args.kv_heads, args.head_dim, device=device, generator=gen).to(dtype)
        for scorer in ("sigmoid_mean", "max_logit", "max_z"):
            t_torch, t_kernel = compare(
                lambda k=k, s=scorer: retrieval.token_scores(q, k, s),
                lambda k=k, s=scorer: scoring.token_scores(q, k, s),
                device, args.reps,
            )  # fmt: skip
            rows.append({"op": f"score {scorer}", "n": n, "torch_ms": t_torch * 1e3, "kernel_ms": t_kernel * 1e3})
        s = n + args.prompt
        qa = torch.randn(1, args.heads, args.prompt, args.head_dim, device=device, generator=gen).to(dtype)
        ka = torch.randn(1, args.kv_heads, s, args.head_dim, device=device, generator=gen).to(dtype)
        va = torch.randn(1, args.kv_heads, s, args.head_dim, device=device, generator=gen).to(dtype)
        mask = torch.arange(s, device=device)[None, :] <= n + torch.arange(args.prompt, device=device)[:, None]
        t_torch, t_kernel = compare(
            lambda qa=qa, ka=ka, va=va, mask=mask: torch.nn.functional.scaled_dot_product_attention(
                qa, ka, va, attn_mask=mask, enable_gqa=True
            ),
            lambda qa=qa, ka=ka, va=va: attention.prefix_causal_attention(qa, ka, va),
            device, args.reps,
        )  # fmt: skip
        op = f"attention T={args.prompt}"
        rows.append({"op": op, "n": n, "torch_ms": t_torch * 1e3, "kernel_ms": t_kernel * 1e3})

    if device == "cpu":
        print(f"smoke run: {len(rows)} comparisons ran under TRITON_INTERPRET=1; no timings are meaningful here")
        return 0
    print(f"{torch.cuda.get_device_name()}  dtype={args.dtype}  T={args.query_tokens}  heads={args.heads}/"
          f"{args.kv_heads}  head_dim={args.head_dim}  (medians of {args.reps})")
    print(f"{'op':<22}{'n':>10}{'torch ms':>12}{'kernel ms':>12}{'torch/kernel':>14}")
    for r in rows:
        ratio = float(r["torch_ms"]) / float(r["kernel_ms"])  # type: ignore[arg-type]
        r["ratio"] = ratio
        print(f"{r['op']:<22}{r['n']:>10}{r['torch_ms']:>12.3f}{r['kernel_ms']:>12.3f}{ratio:>14.2f}")
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {RESULTS / 'kernels.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
