"""kill -9 at random points of inject/save, many times: the last committed snapshot always loads, whole.

One child process (started by the test) forks a writer, lets it inject and save turns in a loop, kills it
with SIGKILL after a random delay, and then checks the store from scratch: the head snapshot loads with
every sha256 verified, the ledger is exactly turns 0..n-1 (no torn or partial turn), n never goes back and
is at least the last save the writer reported, and the latent state equals the replay of that ledger. Forking
a process that already imported torch and built the model keeps each round at a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_store_support import db_url, last_json, one_thread, pg_database, run_child

FIXTURES = (db_url, one_thread, pg_database)

KILLS = 30

MASTER = """
import json, os, random, signal, sys, time
import torch
torch.set_num_threads(1)  # no thread pools exist yet, so fork() below is safe
from mplus_agents.memory import LatentMemory, replay
from mplus_agents.store.store import MemoryStore
from tests.test_store_support import same_state, tiny_llm

url, shards, kills, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
llm = tiny_llm()
SHARD_BYTES = 1024  # many small shards: a save spends most of its time writing and fsyncing files


def text(i):
    return f"turn {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 3)


def writer(fd):
    store = MemoryStore(url, shards, shard_bytes=SHARD_BYTES)
    mem = store.open(llm, "victim")
    i = len(mem.history())
    while True:
        mem.inject(text(i), role="user")
        mem.save()
        os.write(fd, f"{i}\\n".encode())
        i += 1


def files():
    return {str(p.relative_to(shards)) for p in __import__("pathlib").Path(shards).rglob("*") if p.is_file()}


committed, interval = 0, 0.1
stats = {"kills": 0, "left_unreferenced_files": 0, "after_commit": 0, "replays_checked": 0, "progress_rounds": 0}
for k in range(kills):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            writer(w)
        finally:
            os._exit(1)
    os.close(w)
    f = os.fdopen(r)
    # Kill after 0, 1 or 2 completed saves, then a random fraction of one save interval later, so the kill
    # lands anywhere in inject / shard writes / commit / cleanup whatever the speed of the machine.
    reported, wait_for = [], rng.randint(0, 2)
    stamp = time.monotonic()
    while len(reported) < wait_for:
        line = f.readline()
        assert line, "the writer died on its own"
        reported.append(int(line))
        now = time.monotonic()
        if len(reported) > 1:
            interval = 0.8 * interval + 0.2 * (now - stamp)
        stamp = now
    time.sleep(rng.uniform(0.0, 1.5 * interval))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    reported += [int(x) for x in f.read().split()]
    f.close()
    stats["kills"] += 1
    stats["progress_rounds"] += wait_for > 0

    store = MemoryStore(url, shards, shard_bytes=SHARD_BYTES)
    mem = store.open(llm, "victim")  # every shard read and checked against its sha256
    hist = mem.history()
    texts = [t.text for t in hist]
    assert texts == [text(j) for j in range(len(texts))], texts[-3:]
    assert len(texts) >= committed, (len(texts), committed)
    if reported:
        assert len(texts) in (reported[-1] + 1, reported[-1] + 2), (len(texts), reported[-1])
        stats["after_commit"] += len(texts) == reported[-1] + 2
    committed = len(texts)
    with store._read() as s:
        from sqlalchemy import select
        from mplus_agents.store.schema import Shard
        live = set(s.scalars(select(Shard.path)))
    assert live <= files(), "a committed snapshot refers to a file that is not there"
    stats["left_unreferenced_files"] += bool(files() - live)
    if k % 5 == 4 or k == kills - 1:
        state, pending = replay(llm, mem.config, hist)
        rebuilt = LatentMemory(llm, mem.config, state)
        rebuilt.pending = pending
        assert same_state(mem, rebuilt), "the snapshot is not the replay of its ledger"
        stats["replays_checked"] += 1
    store.close()

# One clean save sweeps whatever the killed writers left behind.
store = MemoryStore(url, shards, shard_bytes=SHARD_BYTES)
mem = store.open(llm, "victim")
mem.inject("after the storm", role="user")
mem.save()
with store._read() as s:
    from sqlalchemy import select
    from mplus_agents.store.schema import Shard
    assert set(s.scalars(select(Shard.path))) == files()
stats["turns"] = committed + 1
print(json.dumps(stats))
"""


def test_kill_9_never_leaves_a_half_visible_snapshot(db_url: str, tmp_path: Path) -> None:
    out = run_child(MASTER, db_url, str(tmp_path / "shards"), str(KILLS), "1234").stdout
    stats = last_json(out)
    assert stats["kills"] == KILLS and stats["replays_checked"] >= KILLS // 5
    assert stats["turns"] > stats["progress_rounds"]  # each round that waited for a save added turns
    print(json.dumps(stats))
