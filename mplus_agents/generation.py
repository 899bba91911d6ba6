"""Our own decode loop with explicit positions (DESIGN 4): greedy or sampled, stop strings, streaming.

The first forward (with memory retrieval) is the engine's; this module continues from its logits and cache
one token at a time. Text is streamed incrementally: a piece is released only once it can no longer turn out
to be the start of a stop string or half of a multi-byte character.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


def pick_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> int:
    """Next token from last-position logits [vocab]."""
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(scores, min(cfg.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    probs = torch.softmax(scores, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < cfg.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class DecodeResult:
    """Filled in while `stream_text` runs; read it after the iterator is exhausted."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    text: str = ""


def stream_text(
    first_logits: torch.Tensor,
    step: Callable[[int], torch.Tensor],
    decode: Callable[[list[int]], str],
    eos_ids: set[int],
    cfg: SamplingConfig,
    result: DecodeResult | None = None,
) -> Iterator[str]:
    """Yield text pieces; `step(token)` feeds one token and returns the next logits."""
    result = result if result is not None else DecodeResult()
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    hold = max((len(s) for s in cfg.stop), default=1) - 1
    try:
        yield from _decode_loop(first_logits, step, decode, eos_ids, cfg, result, generator, hold)
    except GeneratorExit:  # the consumer stopped reading: say so instead of a misleading "length"
        result.finish_reason = "cancelled"
        raise


def _decode_loop(
    logits: torch.Tensor,
    step: Callable[[int], torch.Tensor],
    decode: Callable[[list[int]], str],
    eos_ids: set[int],
    cfg: SamplingConfig,
    result: DecodeResult,
    generator: torch.Generator | None,
    hold: int,
) -> Iterator[str]:
    emitted = 0
    for i in range(cfg.max_new_tokens):
        token = pick_token(logits, cfg, generator)
        if token in eos_ids:
            result.finish_reason = "stop"
            break
        result.token_ids.append(token)
        text = decode(result.token_ids)
        cut = _find_stop(text, cfg.stop, emitted)
        if cut is not None:
            result.finish_reason = "stop"
            if cut > emitted:
                yield text[emitted:cut]
            result.text = text[:cut]
            return
        safe = len(text) - hold if cfg.stop else len(text)
        while safe > emitted and text[safe - 1] == "\ufffd":
            safe -= 1  # an incomplete multi-byte character: wait for the rest
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
        if i + 1 < cfg.max_new_tokens:
            logits = step(token)
    text = decode(result.token_ids)
    result.text = text
    if len(text) > emitted:
        yield text[emitted:]


def _find_stop(text: str, stops: Sequence[str], emitted: int) -> int | None:
    best: int | None = None
    for stop in stops:
        at = text.find(stop, max(0, emitted - len(stop)))
        if at != -1 and (best is None or at < best):
            best = at
    return best
