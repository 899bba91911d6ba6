"""Recall benchmark (issue 2 item 7, DESIGN 9): facts said once, then N tokens of unrelated chat, then questions.

All systems run in one process on the same model, questions, greedy decoding and substring scoring:

- `no_memory`    `llm.chat(question)` with an empty memory: [header][question frame]. The floor.
- `fact_alone`   a fresh `LatentMemory` holding only the fact's own turn: [header][fact item][question frame].
                 The model's best case. The same tokens quoted in a plain-HF prompt must give the same reply;
                 the run prints how often they agree (an engine exactness check).
- `full_context` plain HF greedy decoding of [header][every turn so far, quoted][question frame], while that
                 fits the model's window (else n/a).
- `bm25_rag`     BM25Okapi over the user turns so far (lowercase word tokens); the top 5 quoted in
                 chronological order in the same frame; plain HF greedy decoding.
- `latent`       one `LatentMemory`; every turn injected once with `inject(text, role="user")`, in order,
                 incrementally: inject up to the first length, ask, continue to the next length, ask...
                 Asking never changes memory. Replies come from `llm.start` (what `llm.chat` runs), which also
                 reports which long-term blocks were read; the fact turn's block ids are recorded as it is
                 injected, so the table also says whether the fact was in front of the model at all.

A history of N tokens is the longest prefix of the seeded stream whose quoted turns ("user: ...\\n") total
at most N tokens of the model's tokenizer. Outputs: a table on stdout, `recall*.csv` (summary),
`recall_answers*.csv` (every reply), `recall*.json` (run info), `recall*.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import (
    BM25Turns,
    Timer,
    Tokens,
    add_common_args,
    hf_generate,
    latent_generate,
    load_llm,
    out_name,
    print_table,
    read_csv,
    run_info,
    token_axis,
    window,
    write_csv,
    write_json,
)
from conversation import Conversation, Fact, Turn, facts_end_tokens

from mplus_agents import LatentMemory, MPlusLLM
from mplus_agents.engine import ReadInfo

SYSTEMS = ("no_memory", "fact_alone", "full_context", "bm25_rag", "latent")
VIEWS = {"latent_max_z": "max_z", "latent_retriever": "retriever"}
"""Extra latent systems with `--retriever DIR`: the same memory (written once, with retriever keys) read with
another scorer, so every scorer sees exactly the same memory tokens."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1000, 4000, 16000], help="history lengths in tokens")
    p.add_argument("--n-facts", type=int, default=18)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--top-k", type=int, default=5, help="turns quoted by the BM25 baseline")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument(
        "--inject-batch", type=int, default=1,
        help="filler turns per inject_many call (1 = one inject per turn, like a chat; fact turns always alone)",
    )
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the CSV in --out")
    p.add_argument(
        "--retriever", type=Path, default=None,
        help="a `mplus train` output dir: also read the latent memory with the trained retriever and with max_z",
    )
    add_common_args(p)
    return p.parse_args(argv)


def fact_location(mem: LatentMemory, blocks: range, read: ReadInfo) -> str:
    """Where the fact's memory tokens were when the question was read: pool, retrieved, or missed."""
    state = mem.state
    pool = state.pool
    shown = len(pool) if state.config.read_pool_tokens is None else min(state.config.read_pool_tokens, len(pool))
    pool_blocks = set(pool.block[0, len(pool) - shown :].tolist()) if shown else set()
    if pool_blocks & set(blocks):
        return "pool"
    layers = [set(b) for b in read.retrieved_blocks]
    hit = sum(bool(b & set(blocks)) for b in layers)
    if not layers or hit == 0:
        return "missed"
    return "retrieved" if hit == len(layers) else f"retrieved@{hit}/{len(layers)}layers"


def views(llm: MPlusLLM, mem: LatentMemory, args: argparse.Namespace) -> dict[str, LatentMemory]:
    """The `VIEWS` systems: `mem`'s current state under another scorer (nothing is re-injected)."""
    if args.retriever is None:
        return {}
    out = {}
    for name, scorer in VIEWS.items():
        cfg = mem.config.replace(scorer=scorer)
        view = llm.new_memory(cfg)
        view.replace_state(dataclasses.replace(mem.state, config=cfg))
        out[name] = view
    return out


def attach(llm: MPlusLLM, args: argparse.Namespace) -> MPlusLLM:
    """The same model with the trained retriever of `--retriever` (its keys are written at injection)."""
    if args.retriever is None:
        return llm
    from mplus_agents.training import attach_retriever, load_retriever

    retriever, meta = load_retriever(args.retriever)
    print(f"trained retriever from {args.retriever}: layers {meta['layers']}, dim {meta['dim']}, "
          f"{meta.get('steps')} steps", flush=True)
    return attach_retriever(llm, retriever, llm.config)


class Recorder:
    def __init__(self) -> None:
        self.answers: list[dict[str, Any]] = []
        self.times: dict[tuple[str, int], float] = defaultdict(float)

    def add(self, system: str, length: int | str, fact: Fact, reply: str, **extra: Any) -> bool:
        hit = fact.is_hit(reply)
        self.answers.append(
            dict(system=system, length=length, fact=fact.key, lexical_overlap=fact.lexical_overlap,
                 question=fact.question, answer=fact.answers[0], hit=int(hit), reply=reply.strip(), **extra)
        )
        return hit


def ask_constant_systems(
    llm: MPlusLLM, tok: Tokens, facts: list[Fact], args: argparse.Namespace, rec: Recorder
) -> None:
    """Systems whose answer does not depend on the history length."""
    if "no_memory" in args.systems:
        for f in facts:
            reply = llm.chat(f.question, memory=llm.new_memory(), max_new_tokens=args.max_new_tokens)
            rec.add("no_memory", "any", f, str(reply))
    if "fact_alone" in args.systems:
        agree = 0
        for f in facts:
            mem = llm.new_memory()
            mem.inject(f.statement, role="user")
            reply, _ = latent_generate(llm, mem, f.question, args.max_new_tokens)
            hf_reply, _ = hf_generate(llm, tok.framed([f.statement], f.question), args.max_new_tokens)
            agree += reply.strip() == hf_reply.strip()
            rec.add("fact_alone", "any", f, reply, hf_reply=hf_reply.strip())
        print(f"engine check: fact alone in latent memory vs quoted in a plain HF prompt: "
              f"identical replies {agree}/{len(facts)}", flush=True)


def ask_at_length(
    llm: MPlusLLM,
    tok: Tokens,
    facts: list[Fact],
    history: list[Turn],
    mem: LatentMemory,
    fact_blocks: dict[str, range],
    length: int,
    args: argparse.Namespace,
    rec: Recorder,
) -> None:
    texts = [t.text for t in history]
    fact_turn = {t.fact: i for i, t in enumerate(history) if t.fact is not None}
    limit = window(llm) - args.max_new_tokens
    bm25 = BM25Turns(texts) if "bm25_rag" in args.systems else None
    for f in facts:
        if "latent" in args.systems:
            with Timer() as t:
                reply, read = latent_generate(llm, mem, f.question, args.max_new_tokens)
            rec.times[("latent", length)] += t.seconds
            rec.add("latent", length, f, reply, fact_read=fact_location(mem, fact_blocks[f.key], read),
                    retrieved_tokens=read.retrieved_tokens, prefix_tokens=read.prefix_tokens)
        for name, view in views(llm, mem, args).items():
            with Timer() as t:
                reply, read = latent_generate(llm, view, f.question, args.max_new_tokens)
            rec.times[(name, length)] += t.seconds
            rec.add(name, length, f, reply, fact_read=fact_location(view, fact_blocks[f.key], read),
                    retrieved_tokens=read.retrieved_tokens, prefix_tokens=read.prefix_tokens)
        if "full_context" in args.systems:
            ids = tok.framed(texts, f.question)
            if len(ids) <= limit:
                with Timer() as t:
                    reply, _ = hf_generate(llm, ids, args.max_new_tokens)
                rec.times[("full_context", length)] += t.seconds
                rec.add("full_context", length, f, reply, prompt_tokens=len(ids))
        if bm25 is not None:
            with Timer() as t:
                top = bm25.top(f.question, args.top_k)
                ids = tok.framed([texts[i] for i in top], f.question)
                reply, _ = hf_generate(llm, ids, args.max_new_tokens)
            rec.times[("bm25_rag", length)] += t.seconds
            rec.add("bm25_rag", length, f, reply, fact_in_top=int(fact_turn[f.key] in top), prompt_tokens=len(ids))
        print(".", end="", flush=True)
    print(flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    llm = attach(load_llm(args), args)
    tok = Tokens(llm)
    conv = Conversation(seed=args.seed, n_facts=args.n_facts)
    facts = conv.facts
    lengths = sorted(set(args.lengths))
    need = facts_end_tokens(conv, tok.count)
    if lengths[0] < need:
        raise SystemExit(f"the shortest length must be at least {need} tokens (where the last fact is stated)")
    print(f"{llm!r}; memory config {llm.config}", flush=True)
    print(f"{len(facts)} facts ({sum(not f.lexical_overlap for f in facts)} share no content word with their "
          f"question), last fact stated by token {need}", flush=True)
    rec = Recorder()
    ask_constant_systems(llm, tok, facts, args, rec)

    mem = llm.new_memory()
    fact_blocks: dict[str, range] = {}
    history: list[Turn] = []
    total = 0
    inject_time = Timer()
    injected_tokens = 0
    throughput: list[dict[str, Any]] = []
    stream = conv.stream()
    carry: Turn | None = None
    batch: list[Turn] = []

    def flush() -> None:
        nonlocal injected_tokens
        if not batch:
            return
        if "latent" in args.systems:
            before = mem.state.next_block
            with inject_time:
                mem.inject_many([t.text for t in batch], roles=["user"] * len(batch))
            if batch[0].fact is not None:
                fact_blocks[batch[0].fact] = range(before, mem.state.next_block)
        injected_tokens += sum(tok.count(t.text) for t in batch)
        batch.clear()

    for length in lengths:
        seg_start_time, seg_start_tokens = inject_time.seconds, injected_tokens
        wall = time.perf_counter()
        while True:
            turn = carry if carry is not None else next(stream)
            carry = None
            n = tok.count(turn.text)
            if total + n > length:
                carry = turn
                break
            if turn.fact is not None or len(batch) >= args.inject_batch:
                flush()
            batch.append(turn)
            if turn.fact is not None:
                flush()
            history.append(turn)
            total += n
        flush()
        seg_tokens = injected_tokens - seg_start_tokens
        seg_time = inject_time.seconds - seg_start_time
        rate = {
            "length": length, "history_tokens": total, "turns": len(history),
            "segment_tokens": seg_tokens, "segment_seconds": round(seg_time, 2),
            "segment_tok_per_s": round(seg_tokens / seg_time, 1) if seg_time else None,
            "cumulative_tok_per_s": round(injected_tokens / inject_time.seconds, 1) if inject_time.seconds else None,
            "wall_seconds": round(time.perf_counter() - wall, 1),
        }
        if "latent" in args.systems:
            st = mem.stats()
            ltm_bytes = sum(t.numel() * t.element_size() for p in (mem.state.ltm, mem.state.staging)
                            for t in p.tensors().values())
            rate.update(pool_tokens=st.pool_tokens, long_term_tokens=st.long_term_tokens, memory_bytes=st.bytes,
                        ltm_bytes=ltm_bytes)
        throughput.append(rate)
        print(f"[{length}] history {total} tokens in {len(history)} turns; injection {rate['segment_tok_per_s']} "
              f"tok/s this segment, {rate['cumulative_tok_per_s']} overall; asking {len(facts)} questions",
              flush=True)
        ask_at_length(llm, tok, facts, history, mem, fact_blocks, length, args, rec)
        summary = summarise(rec, facts, lengths, args)
        print_table(*summary["table"])

    summary = summarise(rec, facts, lengths, args)
    write_outputs(args, llm, rec, summary, throughput)
    return summary


def summarise(rec: Recorder, facts: list[Fact], lengths: list[int], args: argparse.Namespace) -> dict[str, Any]:
    n = len(facts)
    nolex = {f.key for f in facts if not f.lexical_overlap}
    by: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for a in rec.answers:
        by[(a["system"], a["length"])].append(a)

    def cell(system: str, length: int, pick: Any = None, key: str = "hit") -> tuple[str, int | None, int]:
        rows = by.get((system, length)) or by.get((system, "any")) or []
        if pick is not None:
            rows = [r for r in rows if pick(r)]
            total = sum(1 for f in facts if pick({"fact": f.key}))
        else:
            total = n
        if not rows:
            return "n/a", None, total
        hits = sum(int(r[key] == "pool" or str(r[key]).startswith("retrieved")) if key == "fact_read"
                   else int(r[key]) for r in rows)
        return f"{hits}/{total}", hits, total

    lines: list[tuple[str, Any, str]] = [(s, None, "hit") for s in SYSTEMS if s in args.systems]
    if "bm25_rag" in args.systems:
        lines += [("bm25_rag", "nolex", "hit"), ("bm25_rag", None, "fact_in_top")]
    if "latent" in args.systems:
        lines += [("latent", "nolex", "hit"), ("latent", None, "fact_read")]
    if args.retriever is not None:
        for name in VIEWS:
            lines += [(name, None, "hit"), (name, "nolex", "hit"), (name, None, "fact_read")]
    names = {
        ("bm25_rag", "nolex", "hit"): "bm25_rag, no-overlap questions",
        ("latent", "nolex", "hit"): "latent, no-overlap questions",
        ("bm25_rag", None, "fact_in_top"): f"bm25: fact turn in top {args.top_k}",
        ("latent", None, "fact_read"): "latent: fact tokens read (pool or retrieved)",
        **{(v, "nolex", "hit"): f"{v}, no-overlap questions" for v in VIEWS},
        **{(v, None, "fact_read"): f"{v}: fact tokens read" for v in VIEWS},
    }
    rows: list[list[str]] = []
    csv_rows: list[dict[str, Any]] = []
    for system, subset, key in lines:
        pick = (lambda r: r["fact"] in nolex) if subset == "nolex" else None
        name = names.get((system, subset, key), system)
        row = [name]
        for length in lengths:
            text, hits, total = cell(system, length, pick, key)
            row.append(text)
            csv_rows.append(dict(row=name, system=system, length=length, hits=hits, n=total, cell=text))
        rows.append(row)
    header = ["system \\ history tokens", *[f"{x:,}" for x in lengths]]
    return {"table": (header, rows), "csv": csv_rows}


def write_outputs(
    args: argparse.Namespace, llm: MPlusLLM, rec: Recorder, summary: dict[str, Any], throughput: list[dict[str, Any]]
) -> None:
    write_csv(out_name(args, "recall", "csv"), summary["csv"])
    write_csv(out_name(args, "recall_answers", "csv"), rec.answers)
    info = run_info(args, llm)
    info.update(
        injection=throughput,
        eval_seconds={f"{s}@{length}": round(v, 1) for (s, length), v in rec.times.items()},
        table=summary["table"],
    )
    write_json(out_name(args, "recall", "json"), info)
    plot(args, summary)
    print(f"wrote {out_name(args, 'recall', 'csv')} and friends", flush=True)


def plot(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in summary["csv"]:
        if r["hits"] is not None and (r["row"] in SYSTEMS or r["row"] in VIEWS):
            series[r["row"]].append((r["length"], r["hits"] / r["n"]))
    # Distinct line styles and markers: latent and full context often coincide while everything fits the pool.
    styles = {"no_memory": (":", "v"), "fact_alone": ("--", "^"), "full_context": ("-", "s"),
              "bm25_rag": ("-", "D"), "latent": ("-", "o"), "latent_max_z": ("--", "x"),
              "latent_retriever": ("-", "P")}
    for name, pts in series.items():
        xs, ys = zip(*pts, strict=True)
        line, marker = styles.get(name, ("-", "o"))
        ax.plot(xs, ys, line, marker=marker, markersize=8 if name == "full_context" else 6, alpha=0.85,
                label=name)
    n = summary["csv"][0]["n"] if summary["csv"] else 0
    token_axis(ax, [r["length"] for r in summary["csv"]])
    ax.set_xlabel("history tokens before the questions")
    ax.set_ylabel(f"recall (hits / {n})")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Facts said once, recalled after unrelated chat (SmolLM2-135M)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out_name(args, "recall", "png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    cli_args = parse_args()
    if cli_args.replot:
        plot(cli_args, {"csv": read_csv(out_name(cli_args, "recall", "csv"))})
    else:
        run(cli_args)
