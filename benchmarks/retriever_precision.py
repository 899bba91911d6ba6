"""Retriever precision (issue 6 item 4, SPEC 8.4): does a scorer put the fact's own memory tokens first?

Held-out data: the recall benchmark's chat (`conversation.py`, seed 0 by default: 18 facts whose relations,
wordings and values never appear in `train_data.py`'s training text), every turn injected once as a user
turn through a real memory (`MemoryConfig()` defaults, the same collection code `mplus train` uses), then
every question asked at the end, after N tokens. For each question the candidates are the memory tokens a
read can retrieve (long-term store, staging cache, pool tokens older than the shown window); the relevant
ones are the tokens of the fact's own turn.

Scorers, on exactly the same candidates and query states: the trained retriever (`--retriever DIR`), the
same architecture untrained (seeded init, the control that a trained one must beat), `max_z` (the
training-free scorer; `hybrid` adds BM25 on top of it and is measured by `recall.py`), and chance. Layers
are combined as the shared read combines them. Columns: R-precision (share of the top-|relevant| tokens
that are relevant; chance = |relevant| / candidates), precision of the tokens the read's block selection
picks (`retrieve_tokens`), and how many questions had any fact token selected.

    python benchmarks/retriever_precision.py --retriever DIR --lengths 4000 --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from common import RESULTS, out_name, print_table, write_csv, write_json
from conversation import Conversation

from mplus_agents import MPlusLLM
from mplus_agents.training import CollectOptions, Document, Segment, collect, evaluate, load_retriever
from mplus_agents.training.trainer import new_retriever


def conversation_document(seed: int, n_facts: int, length: int, count) -> Document:  # type: ignore[no-untyped-def]
    conv = Conversation(seed=seed, n_facts=n_facts)
    questions = {f.key: f.question for f in conv.facts}
    segments = []
    for turn in conv.history(length, count):
        seg = Segment(turn.text)
        if turn.fact is not None:
            seg.questions.append(questions[turn.fact])
        segments.append(seg)
    return Document(segments)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--retriever", type=Path, required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=[4000])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-facts", type=int, default=18)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = MPlusLLM.from_default()
    trained, meta = load_retriever(args.retriever)
    untrained = new_retriever(llm, llm.config, meta["dim"], seed=12345)
    layers = tuple(meta["layers"])
    count = lambda text: len(llm.encode(llm.frame.render_item(text, "user")))  # noqa: E731
    rows: list[dict[str, Any]] = []
    for length in args.lengths:
        t0 = time.perf_counter()
        doc = conversation_document(args.seed, args.n_facts, length, count)
        opts = CollectOptions(layers=layers, seed=args.seed, next_prob=0.0, question_delay=(10**9, 10**9))
        data = collect(llm, [doc], llm.config, opts)  # every question is asked after the whole history
        res = evaluate(data, llm.config, llm=llm, retriever=trained, methods=["retriever", "max_z"])
        res["untrained"] = evaluate(data, llm.config, retriever=untrained.eval(), methods=["retriever"])["retriever"]
        print(f"[{length}] {len(data)} questions, {data.keys.shape[1]} memory tokens, {time.perf_counter() - t0:.0f} s",
              flush=True)
        names = {"retriever": "trained retriever", "untrained": "untrained retriever", "max_z": "max_z"}
        for key in ("retriever", "untrained", "max_z"):
            r = res[key]
            rows.append(dict(length=length, scorer=names[key], queries=r["queries"],
                             r_precision=round(r["r_precision"], 4), chance=round(r["chance"], 4),
                             selected_precision=round(r["selected_precision"], 4), fact_selected=r["read"]))
    header = ["history", "scorer", "R-precision", "chance", "selected precision", "fact selected"]
    print_table(header, [[f"{r['length']:,}", r["scorer"], f"{r['r_precision']:.3f}", f"{r['chance']:.3f}",
                          f"{r['selected_precision']:.3f}", f"{r['fact_selected']}/{r['queries']}"] for r in rows])
    write_csv(out_name(args, "retriever_precision", "csv"), rows)
    write_json(out_name(args, "retriever_precision", "json"),
               dict(argv=vars(args) | {"retriever": str(args.retriever), "out": str(args.out)},
                    retriever_meta=meta, memory_config=llm.config.to_json(), rows=rows))
    plot(args, rows)


def plot(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    scorers = ["trained retriever", "untrained retriever", "max_z"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.2
    for i, s in enumerate(scorers):
        ys = [next(r["r_precision"] for r in rows if r["length"] == n and r["scorer"] == s) for n in lengths]
        ax.bar([j + i * width for j in range(len(lengths))], ys, width, label=s)
    chance = [next(r["chance"] for r in rows if r["length"] == n) for n in lengths]
    ax.bar([j + 3 * width for j in range(len(lengths))], chance, width, label="chance", color="grey")
    ax.set_xticks([j + 1.5 * width for j in range(len(lengths))], [f"{n:,} tokens" for n in lengths])
    ax.set_ylabel("R-precision (fact tokens among the top)")
    ax.set_title("Selecting the fact's memory tokens (held-out recall chat, SmolLM2-135M)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_name(args, "retriever_precision", "png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
