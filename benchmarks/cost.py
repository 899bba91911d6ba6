"""Cost benchmark (issue 2 item 7): per-turn latency and resident memory against history length.

One turn, per system, at each history length (the same seeded conversation as recall.py; the user's
message is one of its fact questions, asked in rotation):

- `latent`       read memory for the message (retrieval + first forward), exactly `--new-tokens` greedy
                 tokens (no EOS stop, so all systems decode the same amount), then inject the turn
                 (the message as `user`, the reply as `assistant`, one `inject_many` call), as a chat app does.
                 History is built with one `inject` per turn before the measured turns (not timed).
- `full_context` plain HF `generate` over [header][every turn quoted][question frame] with exactly
                 `--new-tokens` new tokens, while it fits the model window (else n/a).
- `bm25_rag`     BM25 top 5 over the user turns, quoted in the same frame, plain HF `generate` of exactly
                 `--new-tokens` tokens. Building the index (rank-bm25 has no incremental add) is timed and
                 reported separately (`index_s`), not counted in the turn.

Each system runs in its own child process (unless `--no-isolate`) so `rss_mb` (VmRSS after the turns at
that length) and `peak_rss_mb` (VmHWM) belong to that system alone; both include the model (~0.6 GB
fp32) and the Python runtime. `memory_mb` is `LatentMemory.stats().bytes`. Latencies are medians over
`--turns` turns. `x_first` is a latent turn's latency divided by the latent latency at the first length
(issue 2 target: within 1.3x at 160k vs 2k).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import (
    BM25Turns,
    Tokens,
    add_common_args,
    hf_generate,
    latent_turn_forced,
    load_llm,
    out_name,
    peak_rss_bytes,
    print_table,
    read_csv,
    rss_bytes,
    run_info,
    token_axis,
    window,
    write_csv,
    write_json,
)
from conversation import Conversation, Turn

from mplus_agents import LatentMemory, MPlusLLM

SYSTEMS = ("latent", "full_context", "bm25_rag")
MB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2000, 8000, 32000], help="history lengths in tokens")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--turns", type=int, default=3, help="measured turns per length (median reported)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--build-batch", type=int, default=1,
                   help="turns per inject_many call while building the latent history (not timed)")
    p.add_argument("--no-isolate", action="store_true", help="run all systems in this process")
    p.add_argument(
        "--interleave", action="store_true",
        help="latent: build the longest history first, keeping the memory state at every length, then measure "
        "the lengths in rounds (2k, 32k, 160k, 2k, ...) so a shared CPU's load hits every length alike",
    )
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the CSV in --out")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    add_common_args(p)
    return p.parse_args(argv)


class History:
    """The conversation's turns, grown on demand to a token length (the same stream as recall.py)."""

    def __init__(self, tok: Tokens, seed: int) -> None:
        self.tok = tok
        self.conv = Conversation(seed=seed)
        self.stream: Iterator[Turn] = self.conv.stream()
        self.texts: list[str] = []
        self.tokens = 0
        self._carry: Turn | None = None

    def grow_to(self, length: int) -> list[str]:
        """Append stream turns while the total stays <= length; returns the new texts."""
        new: list[str] = []
        while True:
            turn = self._carry or next(self.stream)
            self._carry = None
            n = self.tok.count(turn.text)
            if self.tokens + n > length:
                self._carry = turn
                return new
            self.texts.append(turn.text)
            self.tokens += n
            new.append(turn.text)

    def add(self, text: str) -> None:
        """The measured turn's message joins the history (the in-context systems quote user turns only)."""
        self.texts.append(text)
        self.tokens += self.tok.count(text)

    def message(self, i: int) -> str:
        facts = self.conv.facts
        return facts[i % len(facts)].question


def latent_turn(llm: MPlusLLM, mem: LatentMemory, message: str, new_tokens: int) -> dict[str, float]:
    """One chat turn: read + forced decode, then inject the exchange, as a chat app does."""
    reply, read_s, decode_s, read = latent_turn_forced(llm, mem, message, new_tokens)
    t = time.perf_counter()
    mem.inject_many([message, reply.strip() or "..."], roles=["user", "assistant"])
    inject_s = time.perf_counter() - t
    return dict(turn_s=read_s + decode_s + inject_s, read_s=read_s, decode_s=decode_s, inject_s=inject_s,
                retrieved_tokens=read.retrieved_tokens, prefix_tokens=read.prefix_tokens)


def summary_row(system: str, length: int, history_tokens: int, build_s: float, turns: list[dict[str, float]],
                mem: LatentMemory | None) -> dict[str, Any]:
    row: dict[str, Any] = dict(system=system, length=length, history_tokens=history_tokens,
                               turns=len(turns), build_s=round(build_s, 1))
    if turns:
        for key in turns[0]:
            row[key] = round(statistics.median(t[key] for t in turns), 4)
    row["loadavg_1m"] = round(os.getloadavg()[0], 1)  # the CPU may be shared: context for the timings
    row["rss_mb"] = round(rss_bytes() / MB)
    row["peak_rss_mb"] = round(peak_rss_bytes() / MB)
    if mem is not None:
        st = mem.stats()
        row.update(memory_mb=round(st.bytes / MB, 1), pool_tokens=st.pool_tokens,
                   long_term_tokens=st.long_term_tokens)
    print(f"  {system} @ {length}: {json.dumps(row)}", flush=True)
    return row


def measure_interleaved(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Latent only: every length's memory kept (states are immutable, so older ones share the buffers)."""
    llm = load_llm(args)
    hist = History(Tokens(llm), args.seed)
    mem = llm.new_memory()
    states: dict[int, tuple[Any, int, float]] = {}
    for length in sorted(set(args.lengths)):
        t0 = time.perf_counter()
        new = hist.grow_to(length)
        for i in range(0, len(new), args.build_batch):
            part = new[i : i + args.build_batch]
            mem.inject_many(part, roles=["user"] * len(part))
        states[length] = (mem.state, hist.tokens, time.perf_counter() - t0)
        print(f"  built {length}: {hist.tokens} tokens", flush=True)
    turns: dict[int, list[dict[str, float]]] = {length: [] for length in states}
    for i in range(args.turns):
        for length, (state, tokens, build_s) in states.items():
            # Each length's conversation goes on from its own memory, one turn per round. (Going back to the
            # same state every round would make the longest memory copy its long-term store, which a real
            # chat never does: its store grows in place.)
            mem.replace_state(state)
            turns[length].append(latent_turn(llm, mem, hist.message(i), args.new_tokens))
            states[length] = (mem.state, tokens, build_s)
    rows = []
    for length, (state, tokens, build_s) in states.items():
        mem.replace_state(state)
        rows.append(summary_row("latent", length, tokens, build_s, turns[length], mem))
    return rows, run_info(args, llm)


def measure(system: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if system == "latent" and args.interleave:
        return measure_interleaved(args)
    llm = load_llm(args)
    tok = Tokens(llm)
    hist = History(tok, args.seed)
    mem = llm.new_memory() if system == "latent" else None
    limit = window(llm) - args.new_tokens
    rows: list[dict[str, Any]] = []
    asked = 0
    for length in sorted(set(args.lengths)):
        t0 = time.perf_counter()
        new = hist.grow_to(length)
        if mem is not None:
            for i in range(0, len(new), args.build_batch):
                part = new[i : i + args.build_batch]
                mem.inject_many(part, roles=["user"] * len(part))
        build_s = time.perf_counter() - t0
        turns: list[dict[str, float]] = []
        history_tokens = hist.tokens
        for _ in range(args.turns):
            message = hist.message(asked)
            asked += 1
            if system == "latent":
                assert mem is not None
                turns.append(latent_turn(llm, mem, message, args.new_tokens))
            elif system == "full_context":
                ids = tok.framed(hist.texts, message)
                if len(ids) > limit:
                    break
                t = time.perf_counter()
                _, n_new = hf_generate(llm, ids, args.new_tokens, force=True)
                turns.append(dict(turn_s=time.perf_counter() - t, prompt_tokens=len(ids), new_tokens=n_new))
            else:
                t = time.perf_counter()
                bm25 = BM25Turns(hist.texts)
                index_s = time.perf_counter() - t
                t = time.perf_counter()
                top = bm25.top(message, args.top_k)
                retrieve_s = time.perf_counter() - t
                ids = tok.framed([hist.texts[i] for i in top], message)
                t = time.perf_counter()
                _, n_new = hf_generate(llm, ids, args.new_tokens, force=True)
                gen_s = time.perf_counter() - t
                turns.append(dict(turn_s=retrieve_s + gen_s, retrieve_s=retrieve_s, decode_s=gen_s,
                                  index_s=index_s, prompt_tokens=len(ids), new_tokens=n_new))
            hist.add(message)
        rows.append(summary_row(system, length, history_tokens, build_s, turns, mem))
    return rows, run_info(args, llm)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.worker:
        worker_rows, worker_info = measure(args.worker, args)
        args.worker_out.write_text(json.dumps({"rows": worker_rows, "info": worker_info}, default=str))
        return worker_rows
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    for system in args.systems:
        print(f"{system} ...", flush=True)
        if args.no_isolate:
            part, info = measure(system, args)
            rows += part
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--worker", system, "--worker-out", str(out)], check=True
            )
            data = json.loads(out.read_text())
            rows += data["rows"]
            info = data["info"]
    first = {r["system"]: r["turn_s"] for r in rows if r.get("turn_s") is not None and r["turns"]
             and r["length"] == min(x["length"] for x in rows if x["system"] == r["system"])}
    for r in rows:
        if r.get("turn_s") is not None and r["system"] in first:
            r["x_first"] = round(r["turn_s"] / first[r["system"]], 2)
    report(args, rows, info)
    return rows


def report(args: argparse.Namespace, rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    def f(r: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
        v = r.get(key)
        return "n/a" if v is None else fmt.format(v)

    header = ["system", "history", "turn_s", "x_first", "read/retrieve_s", "decode_s", "inject_s", "index_s",
              "rss_mb", "peak_rss_mb", "memory_mb"]
    table = []
    for r in rows:
        fits = r["turns"] > 0
        table.append([
            r["system"], f"{r['history_tokens']:,}", f(r, "turn_s") if fits else "n/a (window)",
            f(r, "x_first"), f(r, "read_s") if r["system"] == "latent" else f(r, "retrieve_s", "{:.4f}"),
            f(r, "decode_s"), f(r, "inject_s"), f(r, "index_s", "{:.3f}"), f(r, "rss_mb", "{:.0f}"),
            f(r, "peak_rss_mb", "{:.0f}"), f(r, "memory_mb", "{:.0f}"),
        ])
    print_table(header, table)
    write_csv(out_name(args, "cost", "csv"), rows)
    write_json(out_name(args, "cost", "json"), {**info, "argv": sys.argv, "rows": rows})
    plot(args, rows)
    print(f"wrote {out_name(args, 'cost', 'csv')}, .json and .png", flush=True)


def plot(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in SYSTEMS:
        pts = [(r["history_tokens"], r["turn_s"], r["peak_rss_mb"]) for r in rows
               if r["system"] == system and r["turns"] and r.get("turn_s") is not None]
        if not pts:
            continue
        xs, ts, ms = zip(*pts, strict=True)
        ax1.plot(xs, ts, marker="o", label=system)
        ax2.plot(xs, ms, marker="o", label=system)
    for ax, label in ((ax1, f"seconds per turn ({args.new_tokens} new tokens)"), (ax2, "peak RSS (MB)")):
        token_axis(ax, [r["history_tokens"] for r in rows])
        ax.set_xlabel("history tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_yscale("log")
    fig.suptitle("Per-turn cost against history length (SmolLM2-135M, CPU)")
    fig.tight_layout()
    fig.savefig(out_name(args, "cost", "png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    cli_args = parse_args()
    if cli_args.replot:
        plot(cli_args, read_csv(out_name(cli_args, "cost", "csv")))
    else:
        run(cli_args)
