"""Speed against the machine's limits: decode ms/token and injection tokens/s, each next to its alternative.

Decode (greedy, a fixed number of tokens, no EOS stop so every system does equal work), at two context
sizes: a short chat prompt with an empty memory, and a full memory at the current `MemoryConfig()` defaults
(sink + retrieved long-term + shown pool; the table prints its positions) whose in-context alternative is a
prompt of the same length:
- `ours`: `MPlusLLM.start`'s engine calls (memory read, then the fast path's steps on a static cache), whose
  steps run the compiled C step (`mplus_agents/kernels/cpu_decode.c`) on CPU in fp32;
- `ours-torch`: the same fast path with its torch step (the default before the compiled step; also what runs
  without a C compiler);
- `ours-stock`: the same with the fast path off (HF forward + DynamicCache per step);
- `ours-bf16`: `ours` with `Engine.decode_weights = "bfloat16"` (bf16 copies of the matrices; its floor counts
  half the weight bytes);
- `hf-generate`: plain `model.generate` on a prompt of the same total length (per-token time from the
  difference of N-token and 1-token runs, so the prefill is excluded);
- `llama.cpp`: llama-cpp-python on the GGUF the embedded model comes from (Q4_1 weights), same token ids.
Each is also given as a fraction of its bandwidth floor: (weight bytes + attended K/V bytes per token) /
memory bandwidth, where bandwidth is measured in the same run (best of several sums over a 1 GB tensor):
`of floor` against the best bandwidth of the whole run, `of round` as the median over rounds of each round's
decode against the bandwidth measured just before and after it (a shared machine's bandwidth drifts 2x), and
`paired` (fast-path systems, which can be stepped one token at a time) as the median over steps of each
step against a 256 MB bandwidth probe read right before it: this VM's bandwidth jumps between ~33 and ~60 GB/s
every few seconds, so only a reading milliseconds away is the floor the step actually had. `fast` is the
paired median over the steps whose probe read at least 75% of the run's best probe reading (the fast regime,
where a bandwidth-bound loop falls furthest short of a plain sum).

Injection: `LatentMemory.inject` of a long text (fast path on and off) next to plain HF prefill of the same
tokens in the same 512-token chunks, and as FLOP/s over the GEMM FLOP/s measured in the same run.

Systems are measured interleaved, round by round; the table reports medians over rounds (the machine is
shared, so single runs are noisy). Writes speed.csv, speed.json and speed.png under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import RESULTS, eos_ids  # noqa: E402
from conversation import filler_sentence  # noqa: E402

from mplus_agents import MPlusLLM  # noqa: E402
from mplus_agents.default_model import gguf_path  # noqa: E402
from mplus_agents.fast import FastDecoder, StaticCache  # noqa: E402
from mplus_agents.kernels.cpu_decode import PanelArena  # noqa: E402

FAST_REGIME = 0.75
"""A step counts as in the fast bandwidth regime when its probe read at least this share of the run's best."""

Timer = Callable[[], float]


# ---------------------------------------------------------------------------------------------- machine


class BandwidthProbe:
    """Sums over `nbytes` of random floats (2 MB pages unless told otherwise): the read bandwidth of a moment."""

    def __init__(self, nbytes: int = 256 << 20, huge_pages: bool = True) -> None:
        self.arena = PanelArena(nbytes, huge_pages=huge_pages)
        self.data = self.arena.buffer.view(torch.float32)
        self.data.normal_()

    def gbs(self) -> float:
        """GB/s of one sum (256 MB: ~5-10 ms)."""
        t = time.perf_counter()
        self.data.sum()
        return self.data.numel() * 4 / (time.perf_counter() - t) / 1e9


def bandwidth_gbs(reps: int = 5) -> float:
    """Best read bandwidth over a 1 GB fp32 tensor (sum), GB/s: the denominator of every floor.

    Measured on ordinary pages and on 2 MB pages (the compiled step's weights live on 2 MB pages, which stream
    faster), and the best of both is the floor's bandwidth, so the floor is never flattered by the page size.
    """
    best = 0.0
    for huge in (False, True):
        probe = BandwidthProbe(1 << 30, huge_pages=huge)
        best = max(best, *(probe.gbs() for _ in range(reps)))
        del probe
    return best


def gemm_gflops(reps: int = 5) -> float:
    """Best fp32 GEMM throughput over model-shaped and square products, GFLOP/s."""
    best = 0.0
    for m, k, n in ((512, 576, 1536), (512, 1536, 576), (1024, 1024, 1024)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            best = max(best, 4 * 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


# ---------------------------------------------------------------------------------------------- sizes


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads (each parameter once; tied embeddings are the LM head)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_position(llm: MPlusLLM, element_size: int) -> int:
    s = llm.engine.arch.shapes
    return s.layers * 2 * s.kv_heads * s.head_dim * element_size


def flops_per_injected_token(llm: MPlusLLM, context: float) -> float:
    """Linear layers (no embedding / LM head) plus attention at an average of `context` attended positions."""
    s = llm.engine.arch.shapes
    linear = 0
    for block in llm.engine.arch.layers:
        linear += sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    attention = s.layers * 2 * 2 * s.heads * s.head_dim * context
    return 2.0 * linear + attention


def filler_text(llm: MPlusLLM, tokens: int, seed: int) -> str:
    """At least `tokens` tokens of the recall benchmark's unrelated conversation filler."""
    rng = random.Random(seed)
    sentences: list[str] = []
    while True:
        sentences += [filler_sentence(rng) for _ in range(64)]
        text = " ".join(sentences)
        if len(llm.encode(text)) >= tokens:
            return text


# ---------------------------------------------------------------------------------------------- decode


def _read(llm: MPlusLLM, mem: Any, message: str) -> tuple[Any, int, int]:
    """The memory read a generation starts with: (its DynamicCache, next position, first token)."""
    prompt = llm.chat_prompt([{"role": "user", "content": message}], mem.pending)
    with torch.no_grad():
        logits, cache, pos, _ = llm.engine.read(mem.state, llm.sink(mem.config), prompt.ids, prompt.query_index)
    return cache, pos, int(torch.argmax(logits))


def ours_decode(llm: MPlusLLM, mem: Any, message: str, n: int, decoder: FastDecoder | None) -> tuple[float, int]:
    """ms/token of the steps after the memory read (the read is the prefill); returns (ms, prefix+prompt).

    `decoder` runs the steps on a static cache (the compiled C step or the torch fast path, whichever it was
    built with); None takes the stock HF forward + DynamicCache per step.
    """
    cache, pos, token = _read(llm, mem, message)
    context = pos
    if decoder is not None:
        static = StaticCache.from_dynamic(decoder, cache, n)
        t = time.perf_counter()
        for _ in range(n):
            token = int(torch.argmax(decoder.step(static, token, pos)))
            pos += 1
    else:
        t = time.perf_counter()
        with torch.no_grad():
            for _ in range(n):
                token = int(torch.argmax(llm.engine.forward(cache, torch.tensor([token]), pos)[-1]))
                pos += 1
    return (time.perf_counter() - t) / n * 1000, context


def paired_of_floor(
    llm: MPlusLLM, mem: Any, message: str, n: int, decoder: FastDecoder, probe: BandwidthProbe, nbytes: int
) -> list[tuple[float, float]]:
    """Per step of n: (GB/s read just before the step, floor at that bandwidth / the step's time).

    This VM's bandwidth jumps between ~33 and ~60 GB/s every few seconds, which is longer than a step, so a
    reading taken milliseconds before each step is the floor that step actually had.
    """
    cache, pos, token = _read(llm, mem, message)
    static = StaticCache.from_dynamic(decoder, cache, n)
    fractions = []
    for _ in range(n):
        bw = probe.gbs()
        t = time.perf_counter()
        token = int(torch.argmax(decoder.step(static, token, pos)))
        fractions.append((bw, nbytes / (bw * 1e9) / (time.perf_counter() - t)))
        pos += 1
    return fractions


def hf_decode(llm: MPlusLLM, ids: list[int], n: int) -> float:
    """ms/token of plain `generate`, timed between its logits-processor calls (one per step, after prefill)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            stamps.append(time.perf_counter())
            return scores

    x = torch.tensor([ids])
    with torch.no_grad():
        cast(Any, llm.model).generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False,
            eos_token_id=eos_ids(llm), pad_token_id=eos_ids(llm)[0], temperature=None, top_p=None, top_k=None,
            logits_processor=LogitsProcessorList([Stamp()]),
        )
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000


class LlamaCpp:
    """llama-cpp-python on the embedded model's GGUF, fed our token ids (same vocabulary)."""

    def __init__(self, n_ctx: int, threads: int) -> None:
        from llama_cpp import Llama

        self.path = gguf_path()
        self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=threads, n_batch=512, verbose=False)

    def decode(self, ids: list[int], n: int) -> float:
        """ms/token of single-token evals after evaluating `ids` (greedy on the last token's logits)."""
        llm = self.llm
        llm.reset()
        llm.eval(ids)
        token = self._argmax()
        t = time.perf_counter()
        for _ in range(n):
            llm.eval([token])
            token = self._argmax()
        return (time.perf_counter() - t) / n * 1000

    def _argmax(self) -> int:
        import numpy as np

        # Without logits_all, llama-cpp-python 0.3 keeps no scores; read the context's last logits directly.
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def weight_bytes(self) -> int:
        return self.path.stat().st_size


# ---------------------------------------------------------------------------------------------- inject


def ours_inject(llm: MPlusLLM, text: str, fast: bool) -> float:
    """tokens/s of `inject` with the fast path (what MPlusLLM does) or the stock forward."""
    llm.engine.use_fast = fast
    try:
        mem = llm.new_memory()
        t = time.perf_counter()
        report = mem.inject(text, role="user")
        return report.tokens / (time.perf_counter() - t)
    finally:
        llm.engine.use_fast = True


def hf_prefill(llm: MPlusLLM, ids: list[int], chunk: int) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(ids), chunk):
            llm.model(input_ids=torch.tensor([ids[i : i + chunk]]), logits_to_keep=1)
    return len(ids) / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--inject-tokens", type=int, default=4096)
    parser.add_argument("--memory-tokens", type=int, default=12000, help="injected before the full-memory read")
    parser.add_argument("--threads", type=int, default=None, help="torch and llama.cpp threads (default: torch's)")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    llm = MPlusLLM.from_default()
    cfg = llm.config
    message = "Write a long story about a lighthouse keeper and her cat."
    empty = llm.new_memory()
    full = llm.new_memory()
    full.inject(filler_text(llm, args.memory_tokens, seed=1), role="user")
    inject_text = filler_text(llm, args.inject_tokens, seed=2)
    inject_ids = llm.encode(llm.frame.render_item(inject_text, "user"))

    # In-context prompts of the same lengths as the memory reads (real text, same question at the end).
    contexts: dict[str, tuple[Any, list[int]]] = {}
    compiled = FastDecoder(llm.engine.arch)  # the compiled C step when a C compiler is there (the default)
    decoders: dict[str, FastDecoder | None] = {
        "ours": compiled, "ours-torch": FastDecoder(llm.engine.arch, native=False), "ours-stock": None,
    }
    if compiled.native is None:
        print("the compiled step is unavailable (no C compiler or MPLUS_NATIVE=0): `ours` runs the torch step")
    else:  # opt-in: bf16 copies of the matrices (Engine.decode_weights), its floor counts bf16 bytes
        decoders["ours-bf16"] = FastDecoder(llm.engine.arch, weights=torch.bfloat16)
    for name, mem in (("short", empty), ("full-memory", full)):
        _, ctx = ours_decode(llm, mem, message, 1, compiled)
        question = llm.chat_prompt([{"role": "user", "content": message}]).ids.tolist()
        filler = llm.encode(filler_text(llm, ctx + 64, seed=3))[: max(0, ctx - len(question))]
        contexts[name] = (mem, filler + question)

    cpp: LlamaCpp | None = None
    cpp_note = ""
    if not args.no_llamacpp:
        try:
            cpp = LlamaCpp(max(len(ids) for _, ids in contexts.values()) + args.decode_tokens + 16, threads)
        except ImportError:
            cpp_note = "llama-cpp-python not installed (pip install llama-cpp-python); column skipped"
    print(f"threads {threads}; {cpp_note}".rstrip("; "))

    fp32_weights = weight_bytes(llm.model)

    def step_bytes(system: str, ctx_len: int) -> int:
        """Bytes one decode step reads: weights (as each system stores them) + the attended K/V."""
        if system == "llama.cpp":
            assert cpp is not None
            return cpp.weight_bytes() + ctx_len * kv_bytes_per_position(llm, 2)  # f16 K/V by default
        weights = fp32_weights // 2 if system == "ours-bf16" else fp32_weights
        return weights + ctx_len * kv_bytes_per_position(llm, 4)

    decode: dict[tuple[str, str], list[float]] = {}
    paired: dict[tuple[str, str], list[tuple[float, float]]] = {}
    inject: dict[str, list[float]] = {}
    bw: list[float] = []
    gemm: list[float] = []
    n = args.decode_tokens
    round_bw: list[float] = []
    probe = BandwidthProbe()
    for r in range(args.rounds):
        bw.append(bandwidth_gbs())
        gemm.append(gemm_gflops())
        for name, (mem, ids) in contexts.items():
            for system, decoder in decoders.items():
                decode.setdefault((name, system), []).append(ours_decode(llm, mem, message, n, decoder)[0])
                if decoder is not None:
                    nbytes = step_bytes(system, len(ids))
                    steps = paired_of_floor(llm, mem, message, n, decoder, probe, nbytes)
                    paired.setdefault((name, system), []).extend(steps)
            decode.setdefault((name, "hf-generate"), []).append(hf_decode(llm, ids, n))
            if cpp is not None:
                decode.setdefault((name, "llama.cpp"), []).append(cpp.decode(ids, n))
        bw.append(bandwidth_gbs())  # again after the decodes: a shared machine's bandwidth drifts within a round
        round_bw.append(max(bw[-2:]))
        inject.setdefault("ours", []).append(ours_inject(llm, inject_text, fast=True))
        inject.setdefault("ours-stock", []).append(ours_inject(llm, inject_text, fast=False))
        inject.setdefault("hf-prefill", []).append(hf_prefill(llm, inject_ids, cfg.chunk_size))
        print(f"round {r + 1}/{args.rounds}: bandwidth {bw[-1]:.1f} GB/s, GEMM {gemm[-1]:.0f} GFLOP/s", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)  # raw numbers so far, in case a later round dies
        raw = dict(bw=bw, gemm=gemm, inject=inject, decode={f"{c}/{s}": v for (c, s), v in decode.items()})
        (args.out / "speed_raw.json").write_text(json.dumps(raw, indent=1))

    bandwidth = max(bw)  # the floor uses the best bandwidth seen: a floor must not be flattered by noise
    gemm_peak = max(gemm)
    # The fast regime: steps whose probe read at least FAST_REGIME of the best probe reading of the run. The
    # plain paired median mostly reflects whichever regime the run happened to sit in.
    probe_best = max((b for steps in paired.values() for b, _ in steps), default=0.0)

    def paired_median(steps: list[tuple[float, float]], fast: bool) -> float | None:
        chosen = [f for b, f in steps if not fast or b >= FAST_REGIME * probe_best]
        return round(statistics.median(chosen), 3) if len(chosen) >= 5 else None

    rows: list[dict[str, Any]] = []
    for (ctx_name, system), values in decode.items():
        ctx_len = len(contexts[ctx_name][1])
        nbytes = step_bytes(system, ctx_len)
        floor_ms = nbytes / (bandwidth * 1e9) * 1000
        ms = statistics.median(values)
        # Each round's decode against the bandwidth measured around it, as a second reading of the same ratio.
        per_round = [nbytes / (b * 1e9) * 1000 / v for b, v in zip(round_bw, values, strict=True)]
        steps = paired.get((ctx_name, system), [])
        rows.append(dict(
            kind="decode", context=ctx_name, context_tokens=ctx_len, system=system, value=round(ms, 2),
            unit="ms/token", min=round(min(values), 2), max=round(max(values), 2),
            floor_ms=round(floor_ms, 2), of_floor=round(floor_ms / ms, 3),
            of_round_floor=round(statistics.median(per_round), 3),
            of_paired_floor=paired_median(steps, fast=False),
            of_paired_floor_fast=paired_median(steps, fast=True),
            paired_fast_steps=sum(b >= FAST_REGIME * probe_best for b, _ in steps),
        ))
    stock = {r["context"]: r["value"] for r in rows if r["system"] == "hf-generate"}
    for row in rows:
        row["vs_hf_generate"] = round(stock[row["context"]] / row["value"], 2)
    avg_ctx = (cfg.injection_context + len(llm.sink(cfg))) + cfg.chunk_size / 2
    hf_tps = statistics.median(inject["hf-prefill"])
    for system, values in inject.items():
        tps = statistics.median(values)
        # Plain prefill attends to no memory context: count its own, smaller attention work.
        flops = flops_per_injected_token(llm, cfg.chunk_size / 2 if system == "hf-prefill" else avg_ctx)
        rows.append(dict(
            kind="inject", context=f"{len(inject_ids)} tokens", context_tokens=len(inject_ids), system=system,
            value=round(tps, 1), unit="tokens/s", min=round(min(values), 1), max=round(max(values), 1),
            gflops=round(tps * flops / 1e9, 1), of_gemm=round(tps * flops / 1e9 / gemm_peak, 3),
            vs_hf_prefill=round(tps / hf_tps, 2),
        ))
    meta = dict(
        bandwidth_gbs=round(bandwidth, 1), bandwidth_rounds=[round(b, 1) for b in bw],
        gemm_gflops=round(gemm_peak, 1), gemm_rounds=[round(g, 1) for g in gemm], threads=threads,
        fp32_weight_bytes=fp32_weights, gguf_bytes=cpp.weight_bytes() if cpp else None, rounds=args.rounds,
        decode_tokens=n, probe_best_gbs=round(probe_best, 1), fast_regime=FAST_REGIME,
        flops_per_injected_token=flops_per_injected_token(llm, avg_ctx),
        llamacpp=cpp_note or "measured",
    )
    report(rows, meta, args.out)


def report(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nbandwidth {meta['bandwidth_gbs']} GB/s (best of {meta['bandwidth_rounds']}), "
          f"GEMM {meta['gemm_gflops']} GFLOP/s (best of {meta['gemm_rounds']}), threads {meta['threads']}")
    print(f"\n{'decode':<12} {'ctx':>6} {'system':<12} {'ms/tok':>8} {'range':>13} {'floor':>7} {'of floor':>9} "
          f"{'of round':>9} {'paired':>7} {'fast':>5} {'x HF gen':>9}")
    for r in rows:
        if r["kind"] == "decode":
            pair = "n/a" if r["of_paired_floor"] is None else f"{r['of_paired_floor']:.0%}"
            fast = "n/a" if r["of_paired_floor_fast"] is None else f"{r['of_paired_floor_fast']:.0%}"
            print(f"{r['context']:<12} {r['context_tokens']:>6} {r['system']:<12} {r['value']:>8.1f} "
                  f"{r['min']:>6.1f}-{r['max']:<6.1f} {r['floor_ms']:>7.1f} {r['of_floor']:>9.0%} "
                  f"{r['of_round_floor']:>9.0%} {pair:>7} {fast:>5} {r['vs_hf_generate']:>9.2f}")
    print(f"\n{'inject':<12} {'system':<12} {'tok/s':>8} {'range':>13} {'GFLOP/s':>8} {'of GEMM':>8} "
          f"{'x HF prefill':>13}")
    for r in rows:
        if r["kind"] == "inject":
            print(f"{r['context']:<12} {r['system']:<12} {r['value']:>8.0f} {r['min']:>6.0f}-{r['max']:<6.0f} "
                  f"{r['gflops']:>8.1f} {r['of_gemm']:>8.0%} {r['vs_hf_prefill']:>13.2f}")
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(out / "speed.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "speed.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    plot(rows, meta, out / "speed.png")
    print(f"\nwrote {out / 'speed.csv'}, {out / 'speed.json'}, {out / 'speed.png'}")


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    dec = [r for r in rows if r["kind"] == "decode"]
    contexts = list(dict.fromkeys(r["context"] for r in dec))
    systems = list(dict.fromkeys(r["system"] for r in dec))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        xs, ys, labels = [], [], []
        for j, ctx in enumerate(contexts):
            for r in dec:
                if r["system"] == system and r["context"] == ctx:
                    xs.append(j + i * width)
                    ys.append(r["value"])
                    labels.append(f"{r['of_floor']:.0%}")
        bars = a.bar(xs, ys, width, label=system)
        a.bar_label(bars, labels=labels, fontsize=7)
    a.set_xticks([j + 0.4 - width / 2 for j in range(len(contexts))])
    a.set_xticklabels([f"{c} ({next(r['context_tokens'] for r in dec if r['context'] == c)} tok)" for c in contexts])
    a.set_ylabel("ms / token (label: fraction of bandwidth floor)")
    a.set_title(f"decode, {meta['bandwidth_gbs']} GB/s measured")
    a.legend(fontsize=8)
    inj = [r for r in rows if r["kind"] == "inject"]
    bars = b.bar([r["system"] for r in inj], [r["value"] for r in inj])
    b.bar_label(bars, labels=[f"{r['of_gemm']:.0%} of GEMM" for r in inj], fontsize=8)
    b.set_ylabel("tokens / s")
    b.set_title(f"injection, GEMM {meta['gemm_gflops']} GFLOP/s measured")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
