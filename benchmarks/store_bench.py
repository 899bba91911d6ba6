"""Save and load time of `MemoryStore` against memory size, next to raw disk speed measured in the same run.

For each long-term size the benchmark builds a memory of the embedded model's shape (SmolLM2-135M: 30
layers, 3 KV heads of 64; a full default pool of 2,048 tokens plus N long-term tokens of random keys and
values), then times:

- first save: every shard is new (serialise, sha256, write, fsync, rename, one commit);
- next save: after one more injected turn, the way a chat backend saves after each exchange; unchanged
  long-term pieces are recognised and not rewritten;
- load (cold): `MemoryStore.open` after evicting the shard files from the page cache (`posix_fadvise
  DONTNEED`, per file, so other processes' caches are untouched): read, sha256 check, assemble;
- load (warm): the same with the files cached, i.e. the CPU cost of verifying and assembling;
- raw write+fsync and raw read (cold and warm) of the same number of bytes as the first save, to one file
  (best of two runs).

Prints a table and writes `benchmarks/results/store_bench.csv`. Run: `python benchmarks/store_bench.py`
(`--tokens 1024 8192 32768`, `--ltm-dtype bfloat16`, `--dir` for another disk).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mplus_agents import MemoryConfig, MPlusLLM
from mplus_agents.state import MemoryState, TokenStore
from mplus_agents.store.store import MemoryStore

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20


def synthetic_state(llm: MPlusLLM, config: MemoryConfig, ltm_tokens: int, seed: int = 0) -> MemoryState:
    """A full pool and `ltm_tokens` long-term tokens with random K/V and consistent bookkeeping."""
    g = torch.Generator().manual_seed(seed)
    base = llm.empty_state(config)
    shapes = llm.engine.arch.shapes
    layers, heads, dim = shapes.layers, shapes.kv_heads, shapes.head_dim

    def tokens(n: int, first_block: int, dtype: torch.dtype, rf: bool) -> TokenStore:
        blocks = first_block + torch.arange(n) // config.block_size
        return TokenStore(
            k=torch.randn(layers, n, heads, dim, generator=g).to(dtype),
            v=torch.randn(layers, n, heads, dim, generator=g).to(dtype),
            age=torch.arange(n - 1 + config.pool_size, config.pool_size - 1, -1).expand(layers, n).clone(),
            block=blocks.expand(layers, n).clone(),
            rf=torch.full((layers, n), config.ltm_initial_rf) if rf else None,
        )

    ltm = tokens(ltm_tokens, 0, base.ltm.k.dtype, True)
    first_pool_block = (ltm_tokens + config.block_size - 1) // config.block_size
    pool = tokens(config.pool_size, first_pool_block, base.pool.k.dtype, False)
    pool.age = torch.arange(config.pool_size - 1, -1, -1).expand(layers, config.pool_size).clone()
    n_blocks = first_pool_block + (config.pool_size + config.block_size - 1) // config.block_size
    return MemoryState(
        config=config, pool=pool, ltm=ltm, staging=base.staging, injections=n_blocks,
        tokens_injected=ltm_tokens + config.pool_size, next_block=n_blocks, rng_state=base.rng_state,
    )


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_disk(directory: Path, nbytes: int) -> tuple[float, float, float]:
    """(write+fsync s, cold read s, warm read s) of `nbytes` random-ish bytes in one file."""
    data = os.urandom(min(nbytes, 64 * MiB))
    path = directory / "raw.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(data[: min(left, len(data))])
            left -= len(data)
        f.flush()
        os.fsync(f.fileno())
    write = time.perf_counter() - t
    reads = []
    for cold in (True, False):
        if cold:
            evict([path])
        t = time.perf_counter()
        with open(path, "rb") as f:
            while f.read(16 * MiB):
                pass
        reads.append(time.perf_counter() - t)
    path.unlink()
    return write, reads[0], reads[1]


def run(tokens: list[int], directory: Path, ltm_dtype: str | None) -> list[dict[str, float | int | str]]:
    config = MemoryConfig(ltm_dtype=ltm_dtype)
    llm = MPlusLLM.from_default(config)
    rows: list[dict[str, float | int | str]] = []
    for n in tokens:
        work = Path(tempfile.mkdtemp(prefix="store_bench_", dir=directory))
        try:
            store = MemoryStore(work / "store.sqlite3")
            mem = store.open(llm, "bench")
            mem.replace_state(synthetic_state(llm, config, n))
            size = mem.stats().bytes

            t = time.perf_counter()
            first = mem.save()
            first_s = time.perf_counter() - t

            mem.inject("One more message from the user, the way a chat adds a turn after each exchange.", role="user")
            t = time.perf_counter()
            nxt = mem.save()
            next_s = time.perf_counter() - t

            shard_files = [p for p in (work / "store-shards").rglob("*.safetensors")]
            evict(shard_files)
            t = time.perf_counter()
            store.open(llm, "bench")
            load_cold = time.perf_counter() - t
            t = time.perf_counter()
            loaded = store.open(llm, "bench")
            load_warm = time.perf_counter() - t
            assert loaded.stats().long_term_tokens == mem.stats().long_term_tokens

            # The disk is shared: take the best of two raw runs, as the store's numbers are single runs.
            runs = [raw_disk(work, first.bytes_written) for _ in range(2)]
            raw_w, raw_rc, raw_rw = (min(r[i] for r in runs) for i in range(3))
            store.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append(
            {
                "ltm_tokens": n,
                "ltm_dtype": ltm_dtype or "model",
                "state_mib": round(size / MiB, 1),
                "first_save_s": round(first_s, 3),
                "first_save_mib": round(first.bytes_written / MiB, 1),
                "first_shards": first.shards_written,
                "next_save_s": round(next_s, 3),
                "next_save_mib": round(nxt.bytes_written / MiB, 1),
                "next_shards_written": nxt.shards_written,
                "next_shards_reused": nxt.shards_reused,
                "load_cold_s": round(load_cold, 3),
                "load_warm_s": round(load_warm, 3),
                "raw_write_fsync_s": round(raw_w, 3),
                "raw_read_cold_s": round(raw_rc, 3),
                "raw_read_warm_s": round(raw_rw, 3),
            }
        )
        print_row(rows[-1], header=len(rows) == 1)
    return rows


COLUMNS = [
    ("ltm_tokens", "LTM tok", 8),
    ("state_mib", "MiB", 7),
    ("first_save_s", "save1 s", 8),
    ("raw_write_fsync_s", "raw wr s", 9),
    ("next_save_s", "save2 s", 8),
    ("next_save_mib", "save2 MiB", 10),
    ("next_shards_reused", "reused", 7),
    ("load_cold_s", "load cold", 10),
    ("raw_read_cold_s", "raw rd cold", 12),
    ("load_warm_s", "load warm", 10),
    ("raw_read_warm_s", "raw rd warm", 12),
]


def print_row(row: dict[str, float | int | str], header: bool) -> None:
    if header:
        print(" ".join(f"{title:>{w}}" for _, title, w in COLUMNS))
    print(" ".join(f"{row[key]!s:>{w}}" for key, _, w in COLUMNS), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    ap.add_argument("--ltm-dtype", default=None, help="e.g. bfloat16 (default: the model's fp32)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write (which disk)")
    ap.add_argument("--out", type=Path, default=RESULTS / "store_bench.csv")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows = run(args.tokens, args.dir, args.ltm_dtype)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
