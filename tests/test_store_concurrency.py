"""Several writers of one user never lose a turn; different users never block or see each other."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from mplus_agents.errors import InvalidInputError
from mplus_agents.memory import LatentMemory, replay
from mplus_agents.store import LockTimeoutError
from mplus_agents.store.store import MemoryStore
from tests.test_store_support import (
    TEXTS,
    db_url,
    one_thread,
    pg_database,
    popen_child,
    same_state,
    shard_dir,
    tiny_llm,
)

FIXTURES = (db_url, one_thread, pg_database, shard_dir)


def assert_head_is_replay_of_ledger(store: MemoryStore, user: str) -> LatentMemory:
    llm = tiny_llm()
    mem = store.open(llm, user)
    state, pending = replay(llm, mem.config, mem.history())
    rebuilt = LatentMemory(llm, mem.config, state)
    rebuilt.pending = pending
    assert same_state(mem, rebuilt)
    return mem


WRITER = """
import json, os, sys, time
from mplus_agents.store.store import MemoryStore
from tests.test_store_support import tiny_llm

url, shards, tag, n, go, style = sys.argv[1:7]
store = MemoryStore(url, shards)
llm = tiny_llm()
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
rebased = 0
if style == "save":  # one long-lived memory; save() rebases on whatever the other process committed
    mem = store.open(llm, "shared")
    for i in range(int(n)):
        mem.inject(f"{tag} says message number {i}", role="user")
        rebased += mem.save().rebased
else:  # the session pattern: hold the user's lock for load-inject-save
    for i in range(int(n)):
        with store.session(llm, "shared") as mem:
            mem.inject(f"{tag} says message number {i}", role="user")
print(json.dumps({"rebased": rebased}))
"""


def test_two_processes_appending_to_one_user_lose_no_turn(db_url: str, shard_dir: Path, tmp_path: Path) -> None:
    n = 6
    go = tmp_path / "go"
    MemoryStore(db_url, shard_dir)  # migrate once, so the children race on turns, not on the schema
    procs = [
        popen_child(WRITER, db_url, str(shard_dir), tag, str(n), str(go), style)
        for tag, style in (("ann", "save"), ("ben", "session"))
    ]
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
    go.touch()
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    store = MemoryStore(db_url, shard_dir)
    texts = [t.text for t in store.history("shared")]
    assert len(texts) == 2 * n
    for tag in ("ann", "ben"):  # every turn of each writer, in that writer's order
        assert [t for t in texts if t.startswith(tag)] == [f"{tag} says message number {i}" for i in range(n)]
    assert_head_is_replay_of_ledger(store, "shared")
    print("rebased saves of the long-lived writer:", json.loads(outputs[0][0].splitlines()[-1])["rebased"])


def test_two_threads_with_separate_memory_objects(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm()
    mems = [store.open(llm, "shared"), store.open(llm, "shared")]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(4):
                mems[k].inject(f"thread {k} turn {i}", role="user")
                mems[k].save()
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    texts = [t.text for t in store.history("shared")]
    for k in range(2):
        assert [t for t in texts if t.startswith(f"thread {k}")] == [f"thread {k} turn {i}" for i in range(4)]
    head = assert_head_is_replay_of_ledger(store, "shared")
    # Both objects ended on a state that contains everything committed before their last save.
    assert same_state(mems[0], head) or same_state(mems[1], head)


HOLDER = """
import sys, time
from mplus_agents.store.store import MemoryStore

store = MemoryStore(sys.argv[1], sys.argv[2])
with store._user_lock(sys.argv[3]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_locked_user_does_not_block_another(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir, lock_timeout=1.0)
    llm = tiny_llm()
    alice, bob = store.open(llm, "alice"), store.open(llm, "bob")
    alice.inject(TEXTS[0], role="user")
    bob.inject(TEXTS[1], role="user")
    holder = popen_child(HOLDER, db_url, str(shard_dir), "alice")
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        bob.save()  # not blocked by alice's lock
        with pytest.raises(LockTimeoutError, match="alice"):
            alice.save()
        assert alice.history()[0].saved is False  # the refused save changed nothing
    finally:
        holder.kill()
        holder.wait()
    alice.save()  # the lock died with its process
    assert [t.text for t in store.history("alice")] == [TEXTS[0]]
    assert [t.text for t in store.history("bob")] == [TEXTS[1]]


HOSTILE_IDS = [
    "../x",
    "../../etc/passwd",
    "a/b",
    "a\\b",
    ".",
    "..",
    " x",
    "x",
    "X",
    "%",
    "_",
    "NULL",
    "ünïcødé-用户-🙂",
    "'; DROP TABLE mplus_users; --",
    '" OR 1=1 --',
]


def test_hostile_user_ids_stay_isolated(db_url: str, shard_dir: Path, tmp_path: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm()
    mems = {}
    for i, uid in enumerate(HOSTILE_IDS):
        mem = store.open(llm, uid)
        mem.inject(f"private note number {i} belongs to one user only", role="user")
        mem.save()
        mems[uid] = mem
    assert [u.user_id for u in store.users()] == sorted(HOSTILE_IDS)
    for i, uid in enumerate(HOSTILE_IDS):
        assert [t.text for t in store.history(uid)] == [f"private note number {i} belongs to one user only"]
        assert same_state(store.open(llm, uid), mems[uid])
    # No path component comes from a user id: only random or content hashes.
    allowed = re.compile(r"^([0-9a-f]{2}|[0-9a-f]{32}|[0-9a-f]{64}\.safetensors)$")
    for p in shard_dir.rglob("*"):
        assert allowed.match(p.name), p
    locks = Path(str(tmp_path / "store.sqlite3") + ".locks")
    if locks.is_dir():
        assert all(re.fullmatch(r"[0-9a-f]{64}\.lock", p.name) for p in locks.iterdir())
    for p in tmp_path.rglob("*"):  # nothing was written anywhere else
        if p.is_file():
            assert p.is_relative_to(shard_dir) or p.is_relative_to(locks) or p.name.startswith("store.sqlite3"), p
    assert not (tmp_path.parent / "x").exists()

    store.delete_user("../x")
    store.delete_user("%")
    left = [u for u in HOSTILE_IDS if u not in ("../x", "%")]
    assert [u.user_id for u in store.users()] == sorted(left)
    for uid in left:
        assert same_state(store.open(llm, uid), mems[uid])
    for bad in ("", "\t", "a\x00b", "u" * 257):
        with pytest.raises(InvalidInputError):
            store.open(llm, bad)


def test_readers_never_take_the_writers_lock(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir, lock_timeout=0.5)
    llm = tiny_llm()
    mem = store.open(llm, "alice")
    mem.inject(TEXTS[0], role="user")
    mem.save()
    with store.session(llm, "alice") as held:  # the lock is held by this block
        held.inject(TEXTS[1], role="user")
        done = threading.Event()
        seen: list[int] = []

        def read() -> None:
            seen.append(len(store.open(llm, "alice").history()))
            done.set()

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(timeout=300)  # only a deadlock would take this long
        assert done.is_set() and seen == [1]  # read the committed head, without waiting for the session to end
    assert len(store.history("alice")) == 2


def test_readers_during_saves_see_whole_snapshots(db_url: str, shard_dir: Path) -> None:
    """A reader racing a writer (whose saves delete the previous snapshot's shards) retries, never fails."""
    store = MemoryStore(db_url, shard_dir, shard_bytes=1024)
    llm = tiny_llm()
    writer = store.open(llm, "alice")
    committed = {0}
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                seen.append(store.open(llm, "alice").stats().tokens_injected)
        except BaseException as e:  # surfaced below
            errors.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(8):
            writer.inject(f"{TEXTS[i % len(TEXTS)]} (message {i})", role="user")
            writer.save()
            committed.add(writer.stats().tokens_injected)
    finally:
        stop.set()
        reader.join()
    assert not errors, errors
    assert seen and set(seen) <= committed  # every read was exactly one committed snapshot
