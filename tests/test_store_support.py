"""Shared pieces of the store tests: the database backends, tiny models, and helpers to run child processes.

Every store test runs on SQLite; with `MPLUS_TEST_PG_URL` set (a PostgreSQL URL whose user may create
databases, e.g. `postgresql://mplus:mplus@127.0.0.1/postgres`) it also runs on a scratch database on that
server, created for the test session and dropped afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, make_url, text

from mplus_agents import MemoryConfig, MPlusLLM
from mplus_agents.memory import LatentMemory
from mplus_agents.store.schema import ALL_TABLES
from tests.conftest import CharTokenizer, tiny_llama

REPO = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("MPLUS_TEST_PG_URL")

SMALL_INPUT = MemoryConfig(pool_size=96, chunk_size=48, injection_context=48, retrieve_tokens=32, block_size=16)
SMALL_OUTPUT = MemoryConfig.mplus(
    pool_size=64, tokens_per_chunk=8, chunk_size=40, retrieve_tokens=16, ltm_merge_every=2
)
"""M+ settings in small: random per-layer drops, so a faithful round trip must carry the rng state."""

BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(not PG_URL, reason="set MPLUS_TEST_PG_URL to run the store tests on PostgreSQL"),
    ),
]

TEXTS = [
    "My locker code is 4812 and I moved to Lisbon in May.",
    "The cat is called Miso; she hates the vacuum cleaner.",
    "Remind me to call the dentist on Thursday at noon.",
    "Favourite dish: grilled sardines with a green salad.",
    "My sister Ana lives in Porto and works as an architect.",
    "The wifi password at the cabin is blue-heron-77.",
]


def tiny_llm(seed: int = 0, config: MemoryConfig = SMALL_INPUT) -> MPlusLLM:
    return MPlusLLM(tiny_llama(seed), CharTokenizer(), config)


def same_state(a: LatentMemory, b: LatentMemory) -> bool:
    ta, tb = a.state.tensors(), b.state.tensors()
    return (
        ta.keys() == tb.keys()
        and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
        and a.pending == b.pending
        and a.config == b.config
    )


def read_logits(llm: MPlusLLM, mem: LatentMemory, question: str) -> torch.Tensor:
    """Next-token logits of a chat prompt read through `mem` (the first forward of a generation)."""
    prompt = llm.chat_prompt([{"role": "user", "content": question}], mem.pending)
    with torch.no_grad():
        logits, _, _, _ = llm.engine.read(mem.state, llm.sink(mem.config), prompt.ids, prompt.query_index)
    return logits


def child_env() -> dict[str, str]:
    """The repo importable, and one thread per process (see `one_thread`)."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def run_child(code: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `code` in a new Python process; fail with its output if it fails."""
    env = child_env()
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def popen_child(code: str, *args: str) -> subprocess.Popen[str]:
    env = child_env()
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A scratch database on the server of `MPLUS_TEST_PG_URL`, dropped at the end of the session."""
    assert PG_URL is not None
    base = make_url(PG_URL)
    if base.drivername in ("postgresql", "postgres"):
        base = base.set(drivername="postgresql+psycopg")
    name = f"mplus_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store database: an SQLite file, or the PostgreSQL scratch database with its tables emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite3'}"
    url: str = request.getfixturevalue("pg_database")
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        present = {
            r[0] for r in conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"))
        }
        tables = [t for t in ALL_TABLES if t in present]
        if tables:
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    return tmp_path / "shards"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run ~10x faster on one thread when the machine's cores are busy (no OpenMP spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
