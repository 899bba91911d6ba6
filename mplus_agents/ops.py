"""Memory operations of SPEC 3.2 and 4.2-4.3 as pure functions over `MemoryState`.

Every function returns a new state and never writes into the tensors of its input. That is what makes an
injection atomic: the engine computes the next state completely and only then swaps it in, so an error
half-way leaves the user's memory exactly as it was.
"""

from __future__ import annotations

import torch

from mplus_agents.state import MemoryState, TokenStore

EVICT_THRESHOLD = 0.01


def advance_ages(store: TokenStore, amount: int) -> TokenStore:
    """Every token grows older by `amount` injected memory tokens (DESIGN 8.1: time since injection)."""
    return store.with_fields(age=store.age + amount)


def new_token_ages(layers: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The first of `count` new tokens is the oldest: ages count-1 .. 0 (SPEC 4.2)."""
    return torch.arange(count - 1, -1, -1, dtype=torch.int64, device=device).expand(layers, count).clone()


def split_overflow(
    pool: TokenStore, capacity: int, policy: str, generator: torch.Generator
) -> tuple[TokenStore, TokenStore]:
    """Return (kept, dropped). Survivors keep their relative order (SPEC 3.2, "squeezed left")."""
    n = len(pool)
    overflow = n - capacity
    if overflow <= 0:
        return pool, pool.take(torch.arange(0, dtype=torch.int64))
    if policy == "oldest":
        return pool.take(torch.arange(overflow, n)), pool.take(torch.arange(overflow))
    if policy != "random":
        raise ValueError(f"unknown drop policy {policy!r}")
    # One independent permutation per layer (`drop_memory_per_layer=True`), sorted to keep order.
    perm = torch.rand(pool.layers, n, generator=generator).argsort(dim=1)
    keep = perm[:, :capacity].sort(dim=1).values
    drop = perm[:, capacity:].sort(dim=1).values
    return pool.take(keep), pool.take(drop)


def add_to_pool(state: MemoryState, new: TokenStore) -> MemoryState:
    """Append one chunk's new memory tokens, drop the overflow into the staging cache, merge on schedule.

    `new.age` and `new.block` are overwritten here so callers cannot get the bookkeeping wrong.
    """
    cfg = state.config
    count = len(new)
    if count == 0:
        raise ValueError("a chunk must add at least one memory token")
    if count > cfg.pool_size:
        raise ValueError(f"a chunk adds {count} memory tokens but the pool holds only {cfg.pool_size}")
    new = TokenStore.from_fields(new.tensors())
    new.age = new_token_ages(new.layers, count, new.k.device)
    new.block = (state.next_block + torch.arange(count, device=new.k.device) // cfg.block_size).expand(
        new.layers, count
    ).clone()
    blocks_used = (count + cfg.block_size - 1) // cfg.block_size

    generator = torch.Generator().manual_seed(0)
    generator.set_state(state.rng_state.clone())

    # Only tokens already in the pool compete for the remaining places: the new chunk always lands whole on
    # the right (SPEC 3.2), so pool[-K:] is exactly the last chunk's memory, which the next injection reads.
    kept_old, dropped = split_overflow(
        advance_ages(state.pool, count), cfg.pool_size - count, cfg.drop_policy, generator
    )
    kept = kept_old.cat(new)
    staging = advance_ages(state.staging, count)
    if len(dropped):
        staging = staging.cat(dropped.to(dtype=staging.k.dtype, device=staging.k.device))

    out = MemoryState(
        config=cfg,
        pool=kept,
        ltm=advance_ages(state.ltm, count),
        staging=staging,
        injections=state.injections + 1,
        tokens_injected=state.tokens_injected,
        next_block=state.next_block + blocks_used,
        since_merge=state.since_merge + 1,
        rng_state=generator.get_state(),
    )
    if out.since_merge >= cfg.ltm_merge_every:
        out = merge_staging(out)
    return out


def merge_staging(state: MemoryState) -> MemoryState:
    """Move the staging cache into the long-term store, decay recall frequencies, evict (SPEC 4.3)."""
    cfg = state.config
    staged = TokenStore.from_fields(state.staging.tensors())
    staged.rf = torch.full(staged.age.shape, cfg.ltm_initial_rf, dtype=torch.float32, device=staged.age.device)
    ltm = state.ltm.append(staged)
    assert ltm.rf is not None
    if cfg.ltm_decay > 0 and len(ltm):
        decayed = ltm.rf - cfg.ltm_decay
        alive = decayed > EVICT_THRESHOLD
        alive_counts = alive.sum(dim=1)
        ltm = ltm.with_fields(rf=decayed)
        # Never shrink below the retrieval budget: undo this round's decay instead (SPEC 4.3).
        if int(alive_counts.min()) > cfg.retrieve_tokens:
            ltm = _keep_top(ltm, int(alive_counts.min()), decayed)
        else:
            ltm.rf = decayed + cfg.ltm_decay
    if cfg.ltm_max_tokens is not None and len(ltm) > cfg.ltm_max_tokens:
        ltm = _keep_top(ltm, cfg.ltm_max_tokens, -ltm.age.to(torch.float64))
    return MemoryState(
        config=cfg,
        pool=state.pool,
        ltm=ltm,
        staging=state.staging.take(torch.arange(0, dtype=torch.int64)),
        injections=state.injections,
        tokens_injected=state.tokens_injected,
        next_block=state.next_block,
        since_merge=0,
        rng_state=state.rng_state,
    )


def _keep_top(store: TokenStore, count: int, priority: torch.Tensor) -> TokenStore:
    """Keep the `count` highest-priority entries of each layer, in their original order."""
    if count >= len(store):
        return store
    # Stable tie-break by position: among equal priorities, later (newer) entries win.
    n = len(store)
    tie = torch.arange(n, dtype=torch.float64, device=priority.device) / (n + 1)
    idx = (priority.to(torch.float64) + tie * 1e-9).topk(count, dim=1).indices.sort(dim=1).values
    return store.take(idx)


def order_oldest_first(age: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Sort retrieved entries by age descending (oldest first), ties by index (DESIGN 8.5).

    `age` is [n] and `index` is [m] into it.
    """
    if index.numel() == 0:
        return index
    idx_sorted = index.sort().values
    order = torch.argsort(age[idx_sorted], descending=True, stable=True)
    return idx_sorted[order]
