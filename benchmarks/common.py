"""Helpers shared by the recall and cost benchmarks: model loading, memory-config flags, the shared prompt
frame for the in-context baselines, plain-HF greedy decoding, BM25, resident memory and result files.

Every baseline sees the same token sequence a latent memory would produce if it kept the quoted turns
verbatim: [frame header][one "user: ...\\n" item per turn][question frame]. Turns are tokenised one by one,
exactly as `LatentMemory.inject` tokenises them, so "fact alone in memory" and "fact alone quoted in the
prompt" are the same tokens and must give the same reply (recall.py checks this).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as `python benchmarks/recall.py` from anywhere
    sys.path.insert(0, str(HERE))

from conversation import word_tokens  # noqa: E402

from mplus_agents import LatentMemory, MPlusLLM  # noqa: E402
from mplus_agents.config import MemoryConfig  # noqa: E402
from mplus_agents.engine import ReadInfo  # noqa: E402
from mplus_agents.fast import StaticCache  # noqa: E402
from mplus_agents.generation import SamplingConfig  # noqa: E402

RESULTS = HERE / "results"

MEMORY_FLAGS: dict[str, tuple[str, type]] = {
    "pool_size": ("--pool-size", int),
    "retrieve_tokens": ("--retrieve-tokens", int),
    "block_size": ("--block-size", int),
    "scorer": ("--scorer", str),
    "selection": ("--selection", str),
    "injection_context": ("--injection-context", int),
    "ltm_dtype": ("--ltm-dtype", str),
    "read_pool_tokens": ("--read-pool-tokens", int),
    "lexical_weight": ("--lexical-weight", float),
}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="conversation seed (facts, filler, layout)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default fp32)")
    parser.add_argument(
        "--decode-weights", default=None, choices=["bfloat16"],
        help="decode steps read bf16 copies of the fp32 weights (Engine.decode_weights; default: the model's)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for CSV/PNG/JSON outputs")
    parser.add_argument("--tag", default="", help="suffix for output file names (tuning runs)")
    group = parser.add_argument_group("memory config overrides (default: MemoryConfig())")
    for field, (flag, kind) in MEMORY_FLAGS.items():
        group.add_argument(flag, dest=field, type=kind, default=None)
    group.add_argument("--score-layers", type=int, nargs="*", default=None, help="layer indices, e.g. 4 8 12")


def memory_config(args: argparse.Namespace) -> MemoryConfig:
    changes: dict[str, Any] = {f: getattr(args, f) for f in MEMORY_FLAGS if getattr(args, f) is not None}
    if args.score_layers is not None:
        changes["score_layers"] = tuple(args.score_layers)
    return MemoryConfig().replace(**changes)


def load_llm(args: argparse.Namespace) -> MPlusLLM:
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = MPlusLLM.from_default(config=memory_config(args), dtype=args.dtype)
    llm.engine.decode_weights = args.decode_weights
    return llm


def out_name(args: argparse.Namespace, stem: str, ext: str) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    return args.out / f"{stem}{suffix}.{ext}"


# ---------------------------------------------------------------------------------------------- tokens


class Tokens:
    """Counts and encodes quoted turns the way `LatentMemory.inject(text, role=...)` does, with a cache."""

    def __init__(self, llm: MPlusLLM) -> None:
        self.llm = llm
        self._cache: dict[tuple[str, str], list[int]] = {}

    def item(self, text: str, role: str = "user") -> list[int]:
        key = (text, role)
        if key not in self._cache:
            self._cache[key] = self.llm.encode(self.llm.frame.render_item(text, role))
        return self._cache[key]

    def count(self, text: str) -> int:
        return len(self.item(text))

    def header(self) -> list[int]:
        ids = self.llm.encode(self.llm.frame.header)
        if self.llm.frame.add_special_bos and self.llm.tokenizer.bos_token_id is not None:
            ids = [self.llm.tokenizer.bos_token_id, *ids]
        return ids

    def framed(self, turns: Sequence[str], question: str) -> list[int]:
        """[header][turns quoted as user items][question frame]: what the in-context baselines read."""
        ids = self.header()
        for t in turns:
            ids += self.item(t)
        prompt = self.llm.chat_prompt([{"role": "user", "content": question}])
        return ids + prompt.ids.tolist()


def window(llm: MPlusLLM) -> int:
    return int(getattr(llm.model.config, "max_position_embeddings", 8192))


def eos_ids(llm: MPlusLLM) -> list[int]:
    return sorted(llm.eos_ids())


def hf_generate(llm: MPlusLLM, ids: list[int], max_new_tokens: int, *, force: bool = False) -> tuple[str, int]:
    """Plain Hugging Face greedy decoding of `ids` (no memory involved). `force`: exactly max_new_tokens."""
    device = llm.engine.arch.device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids(llm),
        pad_token_id=llm.tokenizer.pad_token_id or eos_ids(llm)[0],
        temperature=None, top_p=None, top_k=None,
    )
    if force:
        kwargs["min_new_tokens"] = max_new_tokens
    with torch.no_grad():
        out = cast(Any, llm.model).generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    new = out[0, len(ids) :].tolist()
    return str(llm.tokenizer.decode(new, skip_special_tokens=True)), len(new)


def latent_generate(llm: MPlusLLM, mem: LatentMemory, question: str, max_new_tokens: int) -> tuple[str, ReadInfo]:
    """What `llm.chat(question, memory=mem)` does, keeping the read report (retrieved blocks)."""
    prompt = llm.chat_prompt([{"role": "user", "content": question}], mem.pending)
    gen = llm.start(prompt, mem, SamplingConfig(max_new_tokens=max_new_tokens))
    return "".join(gen.pieces), gen.read


def latent_turn_forced(
    llm: MPlusLLM, mem: LatentMemory, message: str, new_tokens: int
) -> tuple[str, float, float, ReadInfo]:
    """One latent read + exactly `new_tokens` greedy tokens (no EOS stop, so every system does equal work).

    The same engine calls as `MPlusLLM.start` (read, then one fast-path step, or `forward`, per token).
    Returns (text, seconds for the read / first token, seconds for the remaining tokens, read info).
    """
    state = mem.state
    prompt = llm.chat_prompt([{"role": "user", "content": message}], mem.pending)
    sink = llm.sink(state.config)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits, cache, pos, read = llm.engine.read(state, sink, prompt.ids, prompt.query_index)
        tokens = [int(torch.argmax(logits))]
        t1 = time.perf_counter()
        fast = llm.engine.fast()  # what `start` decodes with (None: the stock forward)
        static = StaticCache.from_dynamic(fast, cache, new_tokens) if fast is not None else None
        for _ in range(new_tokens - 1):
            if fast is not None and static is not None:
                logits = fast.step(static, tokens[-1], pos)
            else:
                logits = llm.engine.forward(cache, torch.tensor([tokens[-1]]), pos)[-1]
            pos += 1
            tokens.append(int(torch.argmax(logits)))
    t2 = time.perf_counter()
    return str(llm.tokenizer.decode(tokens, skip_special_tokens=True)), t1 - t0, t2 - t1, read


# ---------------------------------------------------------------------------------------------- bm25


class BM25Turns:
    """BM25Okapi over user turns (lowercase word tokens); top-k returned in chronological order."""

    def __init__(self, turns: Sequence[str]) -> None:
        from rank_bm25 import BM25Okapi

        self.turns = list(turns)
        self.index = BM25Okapi([word_tokens(t) or ["_"] for t in self.turns])

    def top(self, question: str, k: int = 5) -> list[int]:
        scores = self.index.get_scores(word_tokens(question))
        best = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
        return sorted(best)


# ---------------------------------------------------------------------------------------------- process


def rss_bytes() -> int:
    """Resident set size of this process (VmRSS); 0 where /proc is unavailable."""
    return _proc_status("VmRSS")


def peak_rss_bytes() -> int:
    return _proc_status("VmHWM")


def _proc_status(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Timer:
    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._t


# ---------------------------------------------------------------------------------------------- output


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV written by `write_csv`, numbers parsed back (empty cells become None)."""

    def parse(value: str) -> Any:
        if value == "":
            return None
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def token_axis(ax: Any, lengths: Sequence[float]) -> None:
    """Log x axis with ticks only at the measured lengths, labelled 2k / 64k (no overlapping minor labels)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ticks = sorted(set(lengths))
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t / 1000:.3g}k" if t >= 1000 else f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]], out: Callable[[str], None] = print) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = "\n".join(lines)
    out(text)
    return text


def run_info(args: argparse.Namespace, llm: MPlusLLM) -> dict[str, Any]:
    return {
        "argv": sys.argv,
        "model": llm.name,
        "dtype": str(llm.engine.arch.dtype),
        "decode_weights": llm.engine.decode_weights,
        "threads": torch.get_num_threads(),
        "memory_config": json.loads(llm.config.to_json()),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg": os.getloadavg(),
        "pid": os.getpid(),
    }
