"""Per-user memory state (DESIGN 2): plain tensors, never `nn.Parameter`, so one model serves many users.

Every store is laid out per layer, `[L, n, ...]`. All layers always hold the same number of tokens: each
injection adds the same count to every layer and every drop or eviction removes the same count, so one
tensor per field is enough and nothing is ragged.

Keys are stored *before* RoPE: positions of memory tokens change every time the pool drops or the retrieved
set changes, so rotation is applied when the prefix is assembled (DESIGN 4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from mplus_agents import quant
from mplus_agents.config import MemoryConfig

OPTIONAL_FIELDS = ("hidden", "score_key", "rf", "word", *quant.SCALE_FIELDS)
GROWN_FIELDS = ("k", "v", "block", "hidden", "score_key", "word", *quant.SCALE_FIELDS)
"""Fields kept in growth buffers by `TokenStore.append`; ages and recall counters change on every update anyway."""
MIN_CAPACITY = 1024
Allocator = Callable[[list[int], torch.dtype], torch.Tensor]


@dataclass
class Growth:
    """Spare-capacity buffers behind a long-term store, so appending costs O(new) amortised, not O(store).

    `filled` is the length of the newest store viewing these buffers. Only that store may extend them in
    place; an older view (a state kept after a failed update, a fork) sees a different length and copies
    instead, so no state ever observes another's writes.
    """

    data: dict[str, torch.Tensor]
    filled: int
    allocate: Allocator | None = None
    """Where new buffers come from (None: `torch.empty`). A store loaded memory-mapped gets
    `mplus_agents.filemap.Spill.empty`, so growing it never pulls the whole store into anonymous RAM."""

    @property
    def capacity(self) -> int:
        return int(next(iter(self.data.values())).shape[1])


@dataclass
class TokenStore:
    """A set of memory tokens for every layer."""

    k: torch.Tensor
    """[L, n, kv_heads, head_dim] keys before RoPE."""
    v: torch.Tensor
    """[L, n, kv_heads, head_dim] values."""
    age: torch.Tensor
    """[L, n] int64, injected tokens since this token was injected."""
    block: torch.Tensor
    """[L, n] int64, retrieval block id (blocks never span two chunks)."""
    hidden: torch.Tensor | None = None
    """[L, n, d] memory vectors of the `output` source (needed to re-read them under another adapter)."""
    score_key: torch.Tensor | None = None
    """[L, n, d_proj] keys of a trained retriever, computed once when the token is written (SPEC 4.3 computes
    them when it is dropped; the value is the same, and older pool tokens can then compete in retrieval)."""
    rf: torch.Tensor | None = None
    """[L, n] float32 recall frequencies (long-term store only)."""
    word: torch.Tensor | None = None
    """[L, n] int64 id of the word starting at this token, 0 elsewhere (`input` source, `hybrid` scorer only)."""
    k_scale: torch.Tensor | None = None
    """[L, n, kv_heads] float32 scales when `k` is stored as int8 (`mplus_agents.quant`)."""
    v_scale: torch.Tensor | None = None
    """[L, n, kv_heads] float32 scales when `v` is stored as int8."""
    hidden_scale: torch.Tensor | None = None
    """[L, n] float32 scales when `hidden` is stored as int8."""
    growth: Growth | None = field(default=None, repr=False, compare=False)
    """Private: spare capacity for `append` (not data; never persisted)."""

    @classmethod
    def empty(
        cls,
        layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        hidden_size: int | None = None,
        score_dim: int | None = None,
        with_rf: bool = False,
        with_words: bool = False,
    ) -> TokenStore:
        def z(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(layers, 0, *shape, dtype=dt, device=device)

        int8 = quant.is_quantized(dtype)
        scale = quant.SCALE_DTYPE
        return cls(
            k=z(kv_heads, head_dim),
            v=z(kv_heads, head_dim),
            age=torch.zeros(layers, 0, dtype=torch.int64, device=device),
            block=torch.zeros(layers, 0, dtype=torch.int64, device=device),
            hidden=z(hidden_size) if hidden_size is not None else None,
            score_key=z(score_dim, dt=torch.float32 if int8 else dtype) if score_dim is not None else None,
            rf=torch.zeros(layers, 0, dtype=torch.float32, device=device) if with_rf else None,
            word=torch.zeros(layers, 0, dtype=torch.int64, device=device) if with_words else None,
            k_scale=z(kv_heads, dt=scale) if int8 else None,
            v_scale=z(kv_heads, dt=scale) if int8 else None,
            hidden_scale=z(dt=scale) if int8 and hidden_size is not None else None,
        )

    @classmethod
    def from_fields(cls, fields_: dict[str, torch.Tensor], growth: Growth | None = None) -> TokenStore:
        """Build from a `tensors()`-style mapping (missing optional fields stay None)."""
        unknown = set(fields_) - {"k", "v", "age", "block", *OPTIONAL_FIELDS}
        if unknown:
            raise ValueError(f"unknown token-store fields {sorted(unknown)}")
        return cls(
            k=fields_["k"],
            v=fields_["v"],
            age=fields_["age"],
            block=fields_["block"],
            hidden=fields_.get("hidden"),
            score_key=fields_.get("score_key"),
            rf=fields_.get("rf"),
            word=fields_.get("word"),
            k_scale=fields_.get("k_scale"),
            v_scale=fields_.get("v_scale"),
            hidden_scale=fields_.get("hidden_scale"),
            growth=growth,
        )

    def __len__(self) -> int:
        return int(self.k.shape[1])

    @property
    def layers(self) -> int:
        return int(self.k.shape[0])

    @property
    def quantized(self) -> bool:
        """True when `k`/`v` (and `hidden`) are int8 with per-row scales beside them."""
        return quant.is_quantized(self.k)

    def scale(self, name: str, layer: int) -> torch.Tensor | None:
        """The int8 scales of field `name` in one layer, or None when that field is stored in float."""
        s = getattr(self, quant.scale_name(name), None) if name in quant.QUANT_FIELDS else None
        return None if s is None else s[layer]

    def rows(self, name: str, layer: int, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows `index` of field `name` in one layer, dequantised (to `dtype`, default float32) if int8.

        This is how a read gathers from a compressed or memory-mapped store: only the chosen rows are
        touched and converted, never the whole field.
        """
        t = getattr(self, name)[layer, index]
        s = self.scale(name, layer)
        if s is not None:
            return quant.dequantize(t, s[index], dtype or torch.float32)
        return t if dtype is None else t.to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name != "growth":
                out[f.name] = value
        return out

    def with_fields(self, **changes: torch.Tensor | None) -> TokenStore:
        """A copy with some fields replaced; keeps the growth buffers of the untouched big fields."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def append(self, other: TokenStore) -> TokenStore:
        """Like `cat`, but amortised O(len(other)): the big fields grow in doubling buffers."""
        mine, theirs = self.tensors(), other.tensors()
        if mine.keys() != theirs.keys():
            raise ValueError(f"cannot append stores with fields {sorted(mine)} and {sorted(theirs)}")
        n, m = len(self), len(other)
        g = self.growth
        if g is None or g.filled != n or n + m > g.capacity:
            capacity = max(MIN_CAPACITY, (3 * (n + m)) // 2)  # 1.5x: amortised O(1), at most 50% slack
            allocate = g.allocate if g is not None else None
            data = {}
            for name in GROWN_FIELDS:
                if name in mine:
                    t = mine[name]
                    data[name] = self._buffer(allocate, [t.shape[0], capacity, *t.shape[2:]], t)
                    data[name][:, :n] = t
            g = Growth(data, n, allocate)
        out: dict[str, torch.Tensor] = {}
        for name, t in mine.items():
            if name in g.data:
                g.data[name][:, n : n + m] = theirs[name].to(device=t.device, dtype=t.dtype)
                out[name] = g.data[name][:, : n + m]
            else:
                out[name] = torch.cat([t, theirs[name].to(device=t.device, dtype=t.dtype)], dim=1)
        g.filled = n + m
        return TokenStore.from_fields(out, growth=g)

    @staticmethod
    def _buffer(allocate: Allocator | None, shape: list[int], like: torch.Tensor) -> torch.Tensor:
        if allocate is not None and like.device.type == "cpu":
            return allocate(shape, like.dtype)
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def take(self, index: torch.Tensor) -> TokenStore:
        """Gather tokens per layer; `index` is [L, m] (per-layer choice) or [m] (same for every layer).

        A store with a growth allocator (a memory-mapped one) gathers its big fields into new buffers from that
        allocator, so an eviction does not move the store into anonymous RAM either.
        """
        allocate = self.growth.allocate if self.growth is not None else None

        def gather(name: str, t: torch.Tensor) -> torch.Tensor:
            idx = index.to(t.device)
            shape = [t.shape[0], idx.shape[-1], *t.shape[2:]]
            out = self._buffer(allocate, shape, t) if name in GROWN_FIELDS else None
            if idx.dim() == 1:
                return t[:, idx] if out is None else torch.index_select(t, 1, idx, out=out)
            view = idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])
            return torch.gather(t, 1, view) if out is None else torch.gather(t, 1, view, out=out)

        out = {name: gather(name, t) for name, t in self.tensors().items()}
        if allocate is None:
            return TokenStore.from_fields(out)
        grown = {name: out[name] for name in GROWN_FIELDS if name in out}
        return TokenStore.from_fields(out, growth=Growth(grown, int(index.shape[-1]), allocate))

    def spilled(self, allocate: Allocator) -> TokenStore:
        """This store, unchanged, but growing (`append`) and gathering (`take`) into buffers from `allocate`.

        Used on a store whose tensors are mapped from a file: its current tensors become a full growth buffer
        (capacity = length), so the first append moves it into `allocate`d buffers and nothing writes the file.
        """
        data = {name: t for name, t in self.tensors().items() if name in GROWN_FIELDS}
        return dataclasses.replace(self, growth=Growth(data, len(self), allocate))

    def cat(self, other: TokenStore) -> TokenStore:
        """Append `other` after `self`. Fields missing on one side are an error, not silently dropped."""
        mine, theirs = self.tensors(), other.tensors()
        if mine.keys() != theirs.keys():
            raise ValueError(f"cannot concatenate stores with fields {sorted(mine)} and {sorted(theirs)}")
        return TokenStore.from_fields({n: torch.cat([mine[n], theirs[n].to(mine[n].dtype)], dim=1) for n in mine})

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> TokenStore:
        """Move to a device; cast only the floating vectors (ages, ids and counters keep their types).

        `dtype=torch.int8` quantises `k`, `v` and `hidden` (adding their scales, `mplus_agents.quant`); a
        float `dtype` on a quantised store dequantises them and drops the scales.
        """
        fields_ = self.tensors()
        if dtype is not None and quant.is_quantized(dtype) != self.quantized:
            if self.quantized:
                for name in quant.QUANT_FIELDS:
                    if name in fields_:
                        fields_[name] = quant.dequantize(fields_[name], fields_.pop(quant.scale_name(name)), dtype)
            else:
                for name in quant.QUANT_FIELDS:
                    if name in fields_:
                        fields_[name], fields_[quant.scale_name(name)] = quant.quantize(fields_[name])
        out = {}
        for name, t in fields_.items():
            cast = dtype if (dtype is not None and name in ("k", "v", "hidden", "score_key")) else None
            if cast is not None and (quant.is_quantized(t) != quant.is_quantized(cast)):
                cast = None  # score_key stays float in an int8 store; int8 fields are already converted
            out[name] = t.to(device=device if device is not None else t.device, dtype=cast or t.dtype)
        return TokenStore.from_fields(out)

    def clone(self) -> TokenStore:
        return TokenStore.from_fields({name: t.clone() for name, t in self.tensors().items()})


@dataclass
class MemoryState:
    """Everything one user's latent memory holds. Pure data; `mplus_agents.ops` transforms it."""

    config: MemoryConfig
    pool: TokenStore
    """Short-term memory (STM), oldest first, at most `config.pool_size` tokens."""
    ltm: TokenStore
    """Long-term memory (LTM), merged entries with recall frequencies."""
    staging: TokenStore
    """Dropped tokens not yet merged into `ltm` (searchable at once, DESIGN 8.3)."""
    injections: int = 0
    """Chunks injected so far."""
    tokens_injected: int = 0
    """Tokens of text injected so far (not memory tokens)."""
    next_block: int = 0
    """Next free retrieval-block id."""
    since_merge: int = 0
    """Injections since the staging cache was last merged."""
    rng_state: torch.Tensor = field(default_factory=lambda: torch.Generator().manual_seed(0).get_state())
    """CPU generator state for random drops, so a replay is deterministic."""

    def clone(self) -> MemoryState:
        return MemoryState(
            config=self.config,
            pool=self.pool.clone(),
            ltm=self.ltm.clone(),
            staging=self.staging.clone(),
            injections=self.injections,
            tokens_injected=self.tokens_injected,
            next_block=self.next_block,
            since_merge=self.since_merge,
            rng_state=self.rng_state.clone(),
        )

    def fitted_to(self, template: MemoryState) -> MemoryState:
        """This state checked against `template` (an empty state of the reading model) and moved to its device
        and dtypes, so a memory saved in fp32 can serve a bf16 model. Raises ValueError naming the first
        field whose presence or shape does not match."""
        parts: list[TokenStore] = []
        for part in ("pool", "ltm", "staging"):
            have, want = getattr(self, part), getattr(template, part)
            if have.tensors().keys() != want.tensors().keys():
                raise ValueError(f"{part} holds fields {sorted(have.tensors())}, expected {sorted(want.tensors())}")
            n = len(have)
            for name, t in have.tensors().items():
                expected = (want.layers, n, *getattr(want, name).shape[2:])
                if tuple(t.shape) != expected:
                    raise ValueError(f"{part}.{name} has shape {tuple(t.shape)}, expected {expected}")
            parts.append(have.to(dtype=want.k.dtype, device=want.k.device))
        return dataclasses.replace(self, pool=parts[0], ltm=parts[1], staging=parts[2])

    def nbytes(self) -> int:
        """Bytes the state's tensors hold; counted on the stores' own views, never on `tensors()` copies."""
        parts = (self.pool, self.ltm, self.staging)
        held = sum(t.numel() * t.element_size() for p in parts for t in p.tensors().values())
        return held + self.rng_state.numel() * self.rng_state.element_size() + 4 * 8  # + the four int64 counters

    def long_term_size(self) -> int:
        return len(self.ltm) + len(self.staging)

    def tensors(self, *, contiguous: bool = True) -> dict[str, torch.Tensor]:
        """Flat name -> tensor map, the unit of persistence. `contiguous=False` returns the stores' own views
        (a long-term store's are views into growth buffers), for writers that must not copy the store."""
        out: dict[str, torch.Tensor] = {}
        for part in ("pool", "ltm", "staging"):
            for name, t in getattr(self, part).tensors().items():
                out[f"{part}.{name}"] = t.contiguous() if contiguous else t
        out["rng_state"] = self.rng_state
        out["counters"] = torch.tensor(
            [self.injections, self.tokens_injected, self.next_block, self.since_merge], dtype=torch.int64
        )
        return out

    @classmethod
    def from_tensors(cls, config: MemoryConfig, tensors: dict[str, torch.Tensor]) -> MemoryState:
        parts: dict[str, dict[str, torch.Tensor]] = {"pool": {}, "ltm": {}, "staging": {}}
        for key, t in tensors.items():
            if "." in key:
                part, name = key.split(".", 1)
                if part not in parts:
                    raise ValueError(f"unexpected memory tensor {key!r}")
                parts[part][name] = t
        for part, found in parts.items():
            missing = {"k", "v", "age", "block"} - found.keys()
            if missing:
                raise ValueError(f"memory tensors for {part!r} are missing {sorted(missing)}")
        counters = tensors["counters"].tolist()
        return cls(
            config=config,
            pool=TokenStore.from_fields(parts["pool"]),
            ltm=TokenStore.from_fields(parts["ltm"]),
            staging=TokenStore.from_fields(parts["staging"]),
            injections=int(counters[0]),
            tokens_injected=int(counters[1]),
            next_block=int(counters[2]),
            since_merge=int(counters[3]),
            rng_state=tensors["rng_state"].to(torch.uint8),
        )
