"""Read-settings sweep: one memory written once, read with several scorers and prefix budgets.

How `MemoryConfig()`'s read defaults were chosen. The conversation is recall.py's (seed, facts, filler),
filler turns injected eight per `inject_many` call and fact turns alone (so their block ids are known), into a
memory written with the `hybrid` scorer (which stores word ids; every other scorer ignores them). Then each
variant swaps only read-time settings into the same state and asks all questions, reporting whether the fact's
blocks were in front of the model ("read"), whether the reply contained the answer, and the prefix length.
Variants that change how memory is written (`--write`, e.g. `{"injection_context": 0}`) need their own run.

    python benchmarks/read_sweep.py --length 16000 --variants '[{"scorer": "max_z", "retrieve_tokens": 1024,
        "read_pool_tokens": null}, {"retrieve_tokens": 320, "read_pool_tokens": 64}]'

Writes `read_sweep[_TAG].csv` (one row per variant) and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

from common import add_common_args, load_llm, out_name, print_table, write_csv
from conversation import Conversation

from mplus_agents import MemoryConfig
from mplus_agents.generation import SamplingConfig

DEFAULT_VARIANTS = [
    {"scorer": "max_z", "retrieve_tokens": 1024, "read_pool_tokens": None},
    {"scorer": "hybrid", "retrieve_tokens": 1024, "read_pool_tokens": None},
    {"scorer": "max_z", "retrieve_tokens": 320, "read_pool_tokens": 64},
    {"scorer": "hybrid", "retrieve_tokens": 320, "read_pool_tokens": 64},
    {"scorer": "hybrid", "retrieve_tokens": 192, "read_pool_tokens": 0},
    {"scorer": "hybrid", "retrieve_tokens": 512, "read_pool_tokens": 256},
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=16000, help="history tokens written before the questions")
    p.add_argument("--variants", type=json.loads, default=DEFAULT_VARIANTS, help="JSON list of read settings")
    p.add_argument("--write", type=json.loads, default={}, help="JSON MemoryConfig fields for writing")
    p.add_argument("--max-new-tokens", type=int, default=24)
    add_common_args(p)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    llm = load_llm(args)
    conv = Conversation(seed=args.seed)
    write_cfg = MemoryConfig(**{"scorer": "hybrid", **args.write})
    mem = llm.new_memory(write_cfg)
    fact_blocks: dict[str, set[int]] = {}
    batch: list[str] = []

    def flush() -> None:
        if batch:
            mem.inject_many(batch, roles=["user"] * len(batch))
            batch.clear()

    t0 = time.perf_counter()
    for turn in conv.history(args.length, lambda text: len(llm.encode(text))):
        if turn.fact:
            flush()
            first = mem.state.next_block
            mem.inject(turn.text, role="user")
            fact_blocks[turn.fact] = set(range(first, mem.state.next_block))
        else:
            batch.append(turn.text)
            if len(batch) >= 8:
                flush()
    flush()
    print(f"wrote {mem.stats().tokens_injected} tokens in {time.perf_counter() - t0:.0f} s", flush=True)

    base = mem.state
    rows: list[dict[str, Any]] = []
    for variant in args.variants:
        cfg = write_cfg.replace(**variant)
        mem.config = cfg
        mem.replace_state(dataclasses.replace(base, config=cfg))
        pool = base.pool
        shown = len(pool) if cfg.read_pool_tokens is None else min(cfg.read_pool_tokens, len(pool))
        shown_blocks = set(pool.block[0, len(pool) - shown :].tolist())
        read = answered = prefix = 0
        for fact in conv.facts:
            prompt = llm.chat_prompt([{"role": "user", "content": fact.question}])
            gen = llm.start(prompt, mem, SamplingConfig(max_new_tokens=args.max_new_tokens))
            reply = "".join(gen.pieces)
            blocks = fact_blocks[fact.key]
            read += bool(blocks & shown_blocks) or any(blocks & set(b) for b in gen.read.retrieved_blocks)
            answered += fact.is_hit(reply)
            prefix += gen.read.prefix_tokens
        n = len(conv.facts)
        rows.append(dict(variant=json.dumps(variant), length=args.length, read=read, answered=answered, n=n,
                         mean_prefix_tokens=round(prefix / n), write=json.dumps(args.write)))
        print(f"  {variant}: read {read}/{n}, answered {answered}/{n}", flush=True)
    print_table(["variant", "read", "answered", "prefix"],
                [[r["variant"], f"{r['read']}/{r['n']}", f"{r['answered']}/{r['n']}", r["mean_prefix_tokens"]]
                 for r in rows])
    write_csv(out_name(args, "read_sweep", "csv"), rows)


if __name__ == "__main__":
    main()
