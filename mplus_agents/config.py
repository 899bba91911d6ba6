"""Memory configuration: the sizes and policies of SPEC sections 1, 3 and 4, in one frozen dataclass.

Two presets matter. `MemoryConfig()` is the training-free `input` source tuned for small chat models
(DESIGN 3, 5): whole retrieval blocks, one selection shared by every layer, oldest-first overflow into the
long-term store, no time-based eviction. `MemoryConfig.mplus()` reproduces the released M+ numbers (SPEC 1,
4.3, 6.1) for the `output` source: K=256 tokens per chunk, 10,240 pool tokens, 2,560 retrieved tokens,
random per-layer drops, recall-frequency decay every 60 injections.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

Source = Literal["input", "output"]
DropPolicy = Literal["random", "oldest"]
Selection = Literal["shared", "per_layer"]
Scorer = Literal["auto", "sigmoid_mean", "max_logit", "max_z", "retriever", "hybrid"]
LtmIndex = Literal["exact", "auto", "scan", "torch", "faiss", "faiss_ivf"]


AUTO_SCORE_LAYERS = 5

READ_FIELDS = ("retrieve_tokens", "read_pool_tokens", "selection", "score_layers", "lexical_weight", "ltm_index")
"""MemoryConfig fields that steer reads (which stored tokens a prompt sees and how the store is searched), not
what is stored: a saved memory can be opened with other values and is read with them (`same_storage`). Every
other field shapes the stored tensors or how they were written, so it must match. (`retrieve_tokens` also
bounds decay eviction at later merges: a policy from then on, which leaves the stored state valid.)"""


def auto_score_layers(layers: int) -> tuple[int, ...]:
    """`AUTO_SCORE_LAYERS` layers evenly spread over 40%-80% of the depth (all layers of a shallow model).

    Measured on SmolLM2 (30 layers) at 16k tokens of chat, fact block read for 18 questions with `max_z`:
    layers 12-24 13/18 (as many as all 30 layers), 15-27 10/18, 9-25 8/18, 2-26 8/18, 1-5 2/18.
    """
    if layers <= AUTO_SCORE_LAYERS + 2:
        return tuple(range(layers))
    first, last = round(0.4 * layers), round(0.8 * layers)
    step = (last - first) / (AUTO_SCORE_LAYERS - 1)
    return tuple(sorted({round(first + i * step) for i in range(AUTO_SCORE_LAYERS)}))


@dataclass(frozen=True)
class MemoryConfig:
    """Sizes are per layer and counted in memory tokens."""

    source: Source = "input"
    """`input`: exact K/V of the injected tokens (any model). `output`: M+ as trained (layer outputs)."""
    pool_size: int = 2048
    """N, the short-term pool. Always attended; overflow moves to the long-term store."""
    retrieve_tokens: int = 320
    """K0, long-term tokens placed in the prefix at generation (fewer while the store is smaller). The default
    (five 64-token blocks) and `read_pool_tokens=64` are tuned on the embedded 135M model, which answers from a
    short prefix far better than from a long one (benchmarks/README.md); `MemoryConfig.mplus()` has M+'s."""
    tokens_per_chunk: int = 256
    """K, new memory tokens per chunk for the `output` source (the `input` source keeps every token)."""
    chunk_size: int = 512
    """Injected text is split into chunks of at most this many tokens (SPEC 3.3)."""
    min_chunk: int = 17
    """No chunk is shorter than this; shorter tails are merged into their neighbour (SPEC 3.3)."""
    injection_context: int = 512
    """`input` source: newest pool tokens a chunk attends to while it is encoded (M+ uses K)."""
    read_pool_tokens: int | None = 64
    """Newest pool tokens always shown at a read; older pool tokens compete with the long-term store for the
    retrieval budget instead. None: the whole pool is always shown (M+). A small value keeps the prefix short,
    which small models need (they are distracted by unrelated context), and makes a turn's cost independent
    of the history length: the prefix is at most read_pool_tokens + retrieve_tokens long."""
    drop_policy: DropPolicy = "oldest"
    """Which pool tokens leave for the long-term store on overflow: `random` per layer (M+) or `oldest`."""
    selection: Selection = "shared"
    """`per_layer`: each layer retrieves with its own queries (M+). `shared`: one block selection for all."""
    block_size: int = 64
    """Retrieval granularity in tokens; 1 is single-token retrieval as in M+."""
    scorer: Scorer = "auto"
    """`auto` (resolved at construction): `hybrid` for the `input` source, `max_z` for `output`.
    Training-free scores on pre-RoPE q.k: `sigmoid_mean` (SPEC 4.5's formula), `max_logit` (best query token)
    or `max_z` (best query token after standardising each token's logits over all candidates, an IDF-like
    correction; at 16k tokens of chat it read the fact's block 8/18 times against 6/18 for `max_logit`), or
    `retriever`: the model's trained f_q / f_k projectors with SPEC 4.5's mean of sigmoids, or `hybrid`
    (`input` source): `max_z` plus BM25 over the words the memory tokens were made from (`mplus_agents.lexical`)."""
    lexical_weight: float = 1.0
    """`hybrid` scorer: weight of the standardised BM25 block score against the standardised latent score."""
    score_layers: tuple[int, ...] | None = None
    """Layers whose queries score long-term blocks in `shared` mode. None: `auto_score_layers`, five layers in
    40%-80% of the depth, which select as well as all layers at a sixth of the cost."""
    ltm_merge_every: int = 1
    """Injections between merges of the staging cache into the long-term store (M+: 60)."""
    ltm_initial_rf: float = 10.0
    """Recall frequency given to entries when they enter the long-term store."""
    ltm_decay: float = 0.0
    """Subtracted from every recall frequency at each merge; entries at or below 0.01 are evicted."""
    ltm_max_tokens: int | None = None
    """Hard cap per layer; the oldest entries are evicted beyond it. None: unbounded."""
    ltm_index: LtmIndex = "exact"
    """How reads search the long-term store (mplus_agents.index). `exact` scores every token. `scan` bounds every
    token's score from an int8 copy of the keys in one compiled pass, rescores only the tokens that can matter
    and proves the answer equals `exact`'s (CPU; without a C compiler it is `exact`; at 1M tokens 19 ms per
    layer against 336 ms, benchmarks/retrieval_bench.py). `torch` and `faiss`
    shortlist per query token, rescore exactly and prove the same. These serve `per_layer` reads with
    `max_z`/`max_logit`; other reads fall back to exact. `faiss_ivf` is approximate (nprobe 16 of sqrt(n) lists;
    at 1M tokens 7 ms per layer, 84% of the exact selection) and also serves `shared` reads without a lexical
    part. `auto`: `scan` (or, without the compiled kernels, `torch`) from `index.AUTO_MIN_TOKENS` tokens."""
    ltm_dtype: str | None = None
    """Storage dtype of the long-term store (`bfloat16` halves RAM; `int8` stores keys and values as int8 with
    one float32 scale per token and KV head, about 3.8x less than float32, see `mplus_agents.quant`); None: the
    model's dtype."""
    seed: int = 0
    """Seeds the random drops so that a memory replayed from its ledger is bit-identical."""

    def __post_init__(self) -> None:
        if self.scorer == "auto":  # frozen: resolve once, so the stored config always names a concrete scorer
            object.__setattr__(self, "scorer", "hybrid" if self.source == "input" else "max_z")
        positive = ("pool_size", "tokens_per_chunk", "chunk_size", "min_chunk", "block_size", "ltm_merge_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"MemoryConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.read_pool_tokens is not None and self.read_pool_tokens < 0:
            raise ValueError("MemoryConfig.read_pool_tokens must be >= 0 or None")
        if self.retrieve_tokens < 0 or self.injection_context < 0:
            raise ValueError("MemoryConfig.retrieve_tokens and injection_context must be >= 0")
        if 2 * self.min_chunk > self.chunk_size + 1:
            raise ValueError(
                f"chunk_size ({self.chunk_size}) must be at least 2*min_chunk-1 ({2 * self.min_chunk - 1}) so a "
                "short tail can be rebalanced with its neighbour"
            )
        if self.source == "output" and self.tokens_per_chunk > self.pool_size:
            raise ValueError("tokens_per_chunk cannot exceed pool_size")
        if self.source == "input" and self.chunk_size > self.pool_size:
            raise ValueError("chunk_size cannot exceed pool_size for the input source")
        if self.selection == "shared" and self.drop_policy == "random":
            raise ValueError(
                "selection='shared' needs drop_policy='oldest': random per-layer drops leave each layer "
                "a different long-term store, so one shared selection cannot address them"
            )
        if self.source not in ("input", "output"):
            raise ValueError(f"unknown memory source {self.source!r}")
        if self.ltm_decay < 0 or self.ltm_initial_rf <= 0:
            raise ValueError("ltm_decay must be >= 0 and ltm_initial_rf > 0")
        if self.ltm_index not in ("exact", "auto", "scan", "torch", "faiss", "faiss_ivf"):
            raise ValueError(f"unknown ltm_index {self.ltm_index!r}")
        if self.scorer == "hybrid" and self.source != "input":
            raise ValueError("scorer='hybrid' needs the input source (its memory tokens are the injected tokens)")
        if self.lexical_weight < 0:
            raise ValueError("lexical_weight must be >= 0")
        if self.ltm_dtype not in (None, "float32", "bfloat16", "float16", "int8"):
            raise ValueError(f"ltm_dtype must be float32, bfloat16, float16 or int8, got {self.ltm_dtype!r}")

    @classmethod
    def mplus(cls, **overrides: Any) -> MemoryConfig:
        """The released mplus-8b settings (SPEC 6.1) for the `output` source."""
        base: dict[str, Any] = dict(
            source="output",
            pool_size=10240,
            retrieve_tokens=2560,
            tokens_per_chunk=256,
            chunk_size=512,
            min_chunk=17,
            drop_policy="random",
            selection="per_layer",
            block_size=1,
            scorer="sigmoid_mean",
            read_pool_tokens=None,
            ltm_merge_every=60,
            ltm_initial_rf=10.0,
            ltm_decay=1.0,
        )
        base.update(overrides)
        return cls(**base)

    @property
    def keeps_words(self) -> bool:
        """Memory tokens carry word ids (written with the text, asked with the question): the `hybrid` scorer."""
        return self.scorer == "hybrid"

    def same_storage(self, other: MemoryConfig) -> bool:
        """True when a memory written under `other` can be read under this config: only READ_FIELDS differ."""
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(other)
        return all(mine[k] == theirs[k] for k in mine if k not in READ_FIELDS)

    def scoring_layers(self, layers: int) -> tuple[int, ...]:
        if self.score_layers is None:
            return auto_score_layers(layers)
        bad = [i for i in self.score_layers if not 0 <= i < layers]
        if bad:
            raise ValueError(f"score_layers {bad} out of range for a {layers}-layer model")
        return self.score_layers

    def replace(self, **changes: Any) -> MemoryConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MemoryConfig:
        data = json.loads(text)
        if data.get("score_layers") is not None:
            data["score_layers"] = tuple(data["score_layers"])
        return cls(**data)
