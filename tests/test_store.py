"""MemoryStore: round trips across processes, shared shards, forget, delete, export/import, damage, refusals.

Runs on SQLite, and on PostgreSQL too when `MPLUS_TEST_PG_URL` is set (see `test_store_support.py`).
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path

import pytest
import torch
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from safetensors.torch import save_file
from sqlalchemy import select, text, update

from mplus_agents import MemoryConfig, MemoryMismatchError, MPlusLLM
from mplus_agents.errors import InvalidInputError
from mplus_agents.memory import LatentMemory, replay
from mplus_agents.store import (
    CorruptShardError,
    NotStoredError,
    StoreUnavailableError,
    UnknownTurnError,
    UnknownUserError,
    UserExistsError,
)
from mplus_agents.store.migrate import VERSION_TABLE, head_revision
from mplus_agents.store.schema import Base, Shard, SnapshotShard
from mplus_agents.store.shards import _cuts
from mplus_agents.store.store import MemoryStore
from tests.conftest import CharTokenizer, tiny_qwen3
from tests.test_store_support import (
    SMALL_INPUT,
    SMALL_OUTPUT,
    TEXTS,
    db_url,
    last_json,
    one_thread,
    pg_database,
    read_logits,
    run_child,
    same_state,
    shard_dir,
    tiny_llm,
)

FIXTURES = (db_url, one_thread, pg_database, shard_dir)


def filled(llm: MPlusLLM, store: MemoryStore | None, user: str, texts: list[str] = TEXTS) -> LatentMemory:
    mem = llm.memory(user, store) if store is not None else llm.new_memory(user_id=user)
    for i, t in enumerate(texts):
        mem.inject(t, role="user" if i % 2 == 0 else "assistant")
    return mem


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def referenced(store: MemoryStore) -> set[Path]:
    with store._read() as s:
        return {Path(store.storage.location) / p for p in s.scalars(select(Shard.path))}


# ---------------------------------------------------------------------------------------------- round trips

CHILD_ROUND_TRIP = """
import json, sys, torch
from safetensors.torch import save_file
from mplus_agents.store.store import MemoryStore
from tests.test_store_support import SMALL_INPUT, SMALL_OUTPUT, read_logits, tiny_llm

url, shards, out = sys.argv[1:4]
store = MemoryStore(url, shards)
result = {}
for user, cfg in (("alice", SMALL_INPUT), ("bob", SMALL_OUTPUT)):
    llm = tiny_llm(0, cfg)
    mem = store.open(llm, user)
    tensors = {k: v.contiguous() for k, v in mem.state.tensors().items()}
    tensors["logits"] = read_logits(llm, mem, "what is my locker code?")
    tensors["pending"] = torch.tensor(mem.pending, dtype=torch.int64)
    save_file(tensors, f"{out}/{user}.safetensors")
    result[user] = [[t.id, t.role, t.text, t.tokens] for t in mem.history()]
print(json.dumps(result))
"""


def test_round_trip_in_a_new_process(db_url: str, shard_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    store = MemoryStore(db_url, shard_dir)
    mems = {}
    for user, cfg in (("alice", SMALL_INPUT), ("bob", SMALL_OUTPUT)):
        llm = tiny_llm(0, cfg)
        mem = filled(llm, store, user, TEXTS * 3)
        assert mem.stats().long_term_tokens > 0  # the pool overflowed: all three parts are exercised
        mem.save()
        mems[user] = (llm, mem)
    out = run_child(CHILD_ROUND_TRIP, db_url, str(shard_dir), str(tmp_path)).stdout
    histories = last_json(out)
    for user, (llm, mem) in mems.items():
        got = load_file(str(tmp_path / f"{user}.safetensors"))
        for name, t in mem.state.tensors().items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), (user, name)
        assert got["pending"].tolist() == mem.pending
        expected = read_logits(llm, mem, "what is my locker code?")
        torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-5)
        assert got["logits"].argmax() == expected.argmax()
        assert histories[user] == [[t.id, t.role, t.text, t.tokens] for t in mem.history()]
        assert [t.text for t in mem.history()] == TEXTS * 3


CHILD_SMOL = """
import json, sys
from mplus_agents import MPlusLLM
from mplus_agents.store.store import MemoryStore

llm = MPlusLLM.from_default()
mem = MemoryStore(sys.argv[1], sys.argv[2]).open(llm, "carol")
reply = llm.chat("What is my locker code?", memory=mem, max_new_tokens=12)
print(json.dumps({"reply": reply, "turns": [t.text for t in mem.history()],
                  "sum": [float(v.double().sum()) for v in mem.state.tensors().values()]}))
"""


@pytest.mark.slow
def test_smol_round_trip_same_answer_in_a_new_process(smol: MPlusLLM, db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    mem = smol.memory("carol", store)
    mem.inject("Hi! My locker code is 4812. I keep my bike helmet in it.", role="user")
    mem.inject("Got it, your locker code is 4812.", role="assistant")
    mem.save()
    reply = smol.chat("What is my locker code?", memory=mem, max_new_tokens=12)
    child = last_json(run_child(CHILD_SMOL, db_url, str(shard_dir)).stdout)
    assert child["reply"] == reply
    assert child["turns"] == [t.text for t in mem.history()]
    assert child["sum"] == [float(v.double().sum()) for v in mem.state.tensors().values()]


def test_reopen_in_process_and_history(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm()
    mem = filled(llm, store, "alice", TEXTS[:3])
    assert [(t.id, t.saved) for t in mem.history()] == [(None, False)] * 3
    report = mem.save()
    assert report.turns_committed == 3 and report.version == 1 and not report.rebased
    hist = mem.history()
    assert [t.text for t in hist] == TEXTS[:3] and all(t.saved and t.id is not None for t in hist)
    assert [t.role for t in hist] == ["user", "assistant", "user"]
    assert [t.tokens for t in hist] == [len(llm.encode(llm.frame.render_item(t.text, t.role))) for t in hist]
    again = store.open(llm, "alice")
    assert same_state(mem, again)
    assert again.history() == hist
    assert store.history("alice") == hist
    assert [u.user_id for u in store.users()] == ["alice"]
    assert store.users()[0].turns == 3 and store.users()[0].tokens_injected == mem.stats().tokens_injected


def test_save_rebases_on_a_newer_snapshot_instead_of_losing_turns(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm(0, SMALL_OUTPUT)
    first, second = store.open(llm, "alice"), store.open(llm, "alice")
    first.inject(TEXTS[0], role="user")
    second.inject_many(TEXTS[1:3], roles=["user", "assistant"])
    assert not first.save().rebased
    report = second.save()
    assert report.rebased and report.turns_committed == 2 and report.version == 2
    assert [t.text for t in store.history("alice")] == TEXTS[:3]
    expected = llm.new_memory()
    expected.inject(TEXTS[0], role="user")
    expected.inject_many(TEXTS[1:3], roles=["user", "assistant"])  # the batch is replayed as a batch
    assert same_state(second, expected) and same_state(store.open(llm, "alice"), expected)
    first.inject(TEXTS[3], role="user")
    assert first.save().rebased
    expected.inject(TEXTS[3], role="user")
    assert same_state(first, expected)


def test_session_saves_on_success_only(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm()
    with store.session(llm, "alice") as mem:
        mem.inject(TEXTS[0], role="user")
    with pytest.raises(RuntimeError), store.session(llm, "alice") as mem:
        mem.inject(TEXTS[1], role="user")
        raise RuntimeError("the request failed")
    assert [t.text for t in store.history("alice")] == TEXTS[:1]


def test_in_process_memory_keeps_history_but_cannot_save() -> None:
    llm = tiny_llm()
    mem = llm.memory("dora")
    mem.inject_many(["one two three", "four five six"], roles=["user", "assistant"])
    mem.inject("seven eight")
    assert [(t.id, t.text, t.batch) for t in mem.history()] == [
        (1, "one two three", 1), (2, "four five six", 1), (3, "seven eight", 2)
    ]
    with pytest.raises(NotStoredError, match="store"):
        mem.save()


def test_failed_inject_leaves_state_and_ledger_untouched(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm()
    mem = filled(llm, store, "alice", TEXTS[:2])
    before = mem.state
    with pytest.raises(InvalidInputError):
        mem.inject_many(["fine", ""])
    with pytest.raises(InvalidInputError, match="NUL"):
        mem.inject("a\x00b")
    assert mem.state is before and len(mem.history()) == 2


def test_fsspec_shard_location(tmp_path: Path) -> None:
    import uuid

    url = f"memory://mplus-test-{uuid.uuid4().hex}"
    store = MemoryStore(tmp_path / "s.sqlite3", url)
    llm = tiny_llm()
    mem = filled(llm, store, "alice")
    mem.save()
    assert same_state(mem, MemoryStore(tmp_path / "s.sqlite3", url).open(llm, "alice"))


def test_default_location_is_under_mplus_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLUS_HOME", str(tmp_path / "home"))
    store = MemoryStore()
    assert Path(store.url.database or "") == (tmp_path / "home" / "store.sqlite3").resolve()
    llm = tiny_llm()
    filled(llm, store, "alice", TEXTS[:1]).save()
    assert files_under(tmp_path / "home" / "store-shards")
    with sqlite3.connect(tmp_path / "home" / "store.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---------------------------------------------------------------------------------------------- shards


def test_cuts_follow_content_not_position() -> None:
    blocks = torch.arange(100).repeat_interleave(16)  # 1600 tokens, 16 per retrieval block
    cuts = _cuts(blocks, tokens_per_piece=128, block_size=16)
    assert cuts[0] == 0 and cuts[-1] == 1600 and all(b - a == 128 for a, b in itertools.pairwise(cuts[:-1]))
    dropped = 40  # the oldest 40 tokens leave: every later boundary stays on the same token
    later = _cuts(blocks[dropped:], tokens_per_piece=128, block_size=16)
    assert [c + dropped for c in later[1:]] == [c for c in cuts if c > dropped]
    assert _cuts(torch.zeros(0, dtype=torch.int64), 128, 16) == [0, 0]
    same = _cuts(torch.zeros(1000, dtype=torch.int64), 100, 16)  # no boundary in content: forced every 200
    assert all(b - a <= 200 for a, b in itertools.pairwise(same)) and same[-1] == 1000


def test_unchanged_shards_are_shared_not_rewritten(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir, shard_bytes=2048)  # tiny pieces: many shards per tensor
    llm = tiny_llm()
    mem = filled(llm, store, "alice", TEXTS * 4)
    first = mem.save()
    with store._read() as s:
        before = dict(s.execute(select(SnapshotShard.kind, SnapshotShard.shard_id)
                                .where(SnapshotShard.kind == "ltm.k")).all())
        ltm_before = s.execute(select(SnapshotShard.start, SnapshotShard.shard_id)
                               .where(SnapshotShard.kind == "ltm.k")).all()
    mem.inject("one more short turn", role="user")
    second = mem.save()
    assert second.shards_reused > 0 and second.shards_written < first.shards_written
    with store._read() as s:
        ltm_after = dict(s.execute(select(SnapshotShard.start, SnapshotShard.shard_id)
                                   .where(SnapshotShard.kind == "ltm.k")).all())
    # Old long-term pieces keep their shard (same row, same file); only the newest ones change.
    kept = [start for start, sid in ltm_before if ltm_after.get(start) == sid]
    assert before and len(kept) >= len(ltm_before) - 2 and len(ltm_before) >= 4
    assert files_under(shard_dir) == referenced(store)  # the replaced shards were deleted
    again = store.open(llm, "alice")
    assert same_state(mem, again)
    third = again.save()  # nothing changed: every piece is already stored
    assert third.shards_written == 0 and third.bytes_written == 0


def test_shard_files_are_named_by_their_sha256(db_url: str, shard_dir: Path) -> None:
    import hashlib

    store = MemoryStore(db_url, shard_dir)
    filled(tiny_llm(), store, "alice").save()
    for path in files_under(shard_dir):
        assert path.name == hashlib.sha256(path.read_bytes()).hexdigest() + ".safetensors"


# ---------------------------------------------------------------------------------------------- forget


def test_forget_rebuilds_without_the_turns(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm()
    secret = "The safe combination is zebra-9931-kumquat."
    texts = [*TEXTS[:2], secret, *TEXTS[2:]]
    mem = filled(llm, store, "alice", texts)
    mem.save()
    target = next(t.id for t in mem.history() if t.text == secret)
    mem.inject("an unsaved turn survives the forget", role="user")
    mem.forget([target])
    expected = filled(llm, None, "x", [t for t in texts if t != secret])
    expected.inject("an unsaved turn survives the forget", role="user")
    assert same_state(mem, expected)
    assert secret not in [t.text for t in mem.history()]
    assert all(t.saved for t in mem.history())  # forget commits at once, unsaved turns included
    assert same_state(store.open(llm, "alice"), expected)
    assert files_under(shard_dir) == referenced(store)  # older snapshots and their shards are gone
    if db_url.startswith("sqlite"):
        db = Path(db_url.removeprefix("sqlite:///"))
        for f in db.parent.glob(db.name + "*"):
            if f.is_file():
                assert b"zebra-9931" not in f.read_bytes(), f
    with pytest.raises(UnknownTurnError):
        mem.forget([target])
    with pytest.raises(InvalidInputError):
        mem.forget(target)  # type: ignore[arg-type]


def test_forget_in_process_and_batches_replay_exactly() -> None:
    llm = tiny_llm(0, SMALL_OUTPUT)
    mem = llm.new_memory()
    mem.inject_many(TEXTS[:2], roles=["user", "assistant"])
    snapshot = llm.new_memory()
    snapshot.inject_many(TEXTS[:2], roles=["user", "assistant"])
    mem.inject(TEXTS[2] * 3, role="user")
    state_before = mem.state
    with pytest.raises(UnknownTurnError):
        mem.forget([99])
    assert mem.state is state_before
    mem.forget([3])
    assert same_state(mem, snapshot)  # the two batched turns were replayed as one batch again
    assert [t.id for t in mem.history()] == [1, 2]


def test_replay_of_the_ledger_equals_the_state(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm(0, SMALL_OUTPUT)
    mem = filled(llm, store, "alice", TEXTS * 2)
    mem.save()
    state, pending = replay(llm, mem.config, store.history("alice"))
    rebuilt = LatentMemory(llm, mem.config, state)
    rebuilt.pending = pending
    assert same_state(rebuilt, mem)


def test_reset_drops_the_saved_history_on_save(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm()
    mem = filled(llm, store, "alice", TEXTS[:3])
    mem.save()
    mem.reset()
    assert mem.history() == []
    mem.inject("a fresh start", role="user")
    mem.save()
    assert [t.text for t in store.history("alice")] == ["a fresh start"]
    assert same_state(store.open(llm, "alice"), filled(llm, None, "x", ["a fresh start"]))


# ---------------------------------------------------------------------------------------------- delete


def test_delete_user_removes_rows_and_shards_only_of_that_user(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm()
    alice = filled(llm, store, "alice")
    alice.save()
    bob = filled(llm, store, "bob", TEXTS[::-1])
    bob.save()
    head = store._head("alice")
    assert head is not None and (shard_dir / head.key).is_dir()
    before = files_under(shard_dir)
    store.delete_user("alice")
    assert [u.user_id for u in store.users()] == ["bob"]
    assert not (shard_dir / head.key).exists()
    assert files_under(shard_dir) == referenced(store) and files_under(shard_dir) < before
    with store._read() as s:
        assert s.scalar(text("SELECT count(*) FROM mplus_turns")) == len(TEXTS)
    assert same_state(store.open(llm, "bob"), bob)
    with pytest.raises(UnknownUserError, match="alice"):
        store.delete_user("alice")
    with pytest.raises(UnknownUserError):
        store.history("alice")
    assert store.open(llm, "alice").stats().tokens_injected == 0  # a new, empty memory


# ---------------------------------------------------------------------------------------------- export/import


def test_export_import_round_trip(db_url: str, shard_dir: Path, tmp_path: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm(0, SMALL_OUTPUT)
    mem = filled(llm, store, "alice", TEXTS * 2)
    mem.save()
    mem.inject("unsaved, but exported", role="user")
    mem.export(tmp_path / "alice.export")
    manifest = json.loads((tmp_path / "alice.export" / "manifest.json").read_text())
    assert manifest["user_id"] == "alice" and manifest["turns"] == 2 * len(TEXTS) + 1
    assert len((tmp_path / "alice.export" / "ledger.jsonl").read_text().splitlines()) == 2 * len(TEXTS) + 1

    other = MemoryStore(tmp_path / "other.sqlite3")
    assert other.import_(tmp_path / "alice.export") == "alice"
    assert other.import_(tmp_path / "alice.export", "carol") == "carol"
    for user in ("alice", "carol"):
        copy = other.open(llm, user)
        assert same_state(copy, mem)
        assert [(t.text, t.role, t.tokens) for t in copy.history()] == [
            (t.text, t.role, t.tokens) for t in mem.history()
        ]
    with pytest.raises(UserExistsError):
        other.import_(tmp_path / "alice.export")
    other.import_(tmp_path / "alice.export", replace=True)

    # The store-level export needs no model and matches the saved state.
    store.export("alice", tmp_path / "stored.export")
    third = MemoryStore(tmp_path / "third.sqlite3")
    third.import_(tmp_path / "stored.export", "dave")
    saved = store.open(llm, "alice")
    assert same_state(third.open(llm, "dave"), saved)
    with pytest.raises(InvalidInputError, match="exists"):
        store.export("alice", tmp_path / "stored.export")
    with pytest.raises(UnknownUserError):
        store.export("nobody", tmp_path / "x.export")

    shard = next((tmp_path / "alice.export" / "shards").iterdir())
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="corrupted"):
        third.import_(tmp_path / "alice.export", "eve")
    assert "eve" not in [u.user_id for u in third.users()]


# ---------------------------------------------------------------------------------------------- damage


def test_corrupt_or_missing_shard_is_reported_and_rebuilt(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm(0, SMALL_OUTPUT)
    mem = filled(llm, store, "alice", TEXTS * 2)
    mem.save()
    with store._read() as s:
        path = s.scalar(
            select(Shard.path).join(SnapshotShard, SnapshotShard.shard_id == Shard.id)
            .where(SnapshotShard.kind == "ltm.k")
        )
    file = shard_dir / path
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"corrupted.*rebuild=True"):
        store.open(llm, "alice")
    rebuilt = store.open(llm, "alice", rebuild=True)
    assert same_state(rebuilt, mem) and rebuilt.history()[-1].text == mem.history()[-1].text
    assert same_state(store.open(llm, "alice"), mem)

    file = next(iter(referenced(store)))
    file.unlink()
    with pytest.raises(CorruptShardError, match="missing"):
        store.open(llm, "alice")
    assert same_state(store.open(llm, "alice", rebuild=True), mem)


def test_shard_of_another_user_is_refused(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm()
    filled(llm, store, "alice").save()
    filled(llm, store, "bob", TEXTS[::-1]).save()
    with store._write() as s, s.begin():
        bob_path = s.scalar(select(Shard.path).where(Shard.memory_id == 2).limit(1))
        s.execute(update(Shard).where(Shard.memory_id == 1).values(path=bob_path))
    with pytest.raises(CorruptShardError, match="outside this user's memory"):
        store.open(llm, "alice")


def test_other_model_is_refused_and_can_rebuild(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm(0)
    mem = filled(llm, store, "alice")
    mem.save()
    other_weights = tiny_llm(1)  # same architecture and config, other weights
    with pytest.raises(MemoryMismatchError, match=r"weights_sha256.*rebuild=True"):
        store.open(other_weights, "alice")
    qwen = MPlusLLM(tiny_qwen3(), CharTokenizer(), SMALL_INPUT)
    with pytest.raises(MemoryMismatchError, match="config_sha256"):
        store.open(qwen, "alice")
    with pytest.raises(MemoryMismatchError, match="memory config"):
        store.open(llm, "alice", config=MemoryConfig(pool_size=128, chunk_size=48, injection_context=48))
    rebuilt = store.open(qwen, "alice", rebuild=True)
    assert same_state(rebuilt, filled(qwen, None, "x"))
    assert same_state(store.open(qwen, "alice"), rebuilt)
    with pytest.raises(MemoryMismatchError):
        store.open(llm, "alice")  # now the old model is the stranger
    with pytest.raises(MemoryMismatchError, match="nothing was saved"):
        mem.inject("late turn")
        mem.save()  # a memory opened before the rebuild must not overwrite it


def test_read_time_config_is_applied_on_open_and_saved(db_url: str, shard_dir: Path) -> None:
    """Another index, budget or selection reads a stored memory as a memory written under it would be read."""
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm()
    filled(llm, store, "alice").save()
    reads = SMALL_INPUT.replace(retrieve_tokens=48, read_pool_tokens=16, selection="per_layer", ltm_index="torch")
    mem = store.open(llm, "alice", config=reads)
    assert mem.config == mem.state.config == reads
    fresh = LatentMemory(llm, reads)
    for i, t in enumerate(TEXTS):
        fresh.inject(t, role="user" if i % 2 == 0 else "assistant")
    assert same_state(mem, fresh)
    assert torch.equal(read_logits(llm, mem, "what is the code"), read_logits(llm, fresh, "what is the code"))
    mem.inject("one more turn")
    mem.save()
    assert store.open(llm, "alice").config == reads  # the snapshot carries the config it was saved with
    stale = store.open(llm, "alice", config=SMALL_INPUT)  # and the old read settings still open it
    stale.inject("and another")
    stale.save()
    with pytest.raises(MemoryMismatchError, match="stores memory differently"):
        store.open(llm, "alice", config=SMALL_INPUT.replace(block_size=8))
    with pytest.raises(MemoryMismatchError, match="rebuild"):
        stale.use_config(SMALL_INPUT.replace(pool_size=128))
    assert stale.config == SMALL_INPUT


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_urls_and_ids_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailableError, match="does not exist"):
        MemoryStore("sqlite:////nonexistent-dir/x/store.sqlite3")
    with pytest.raises(StoreUnavailableError, match="unsupported database"):
        MemoryStore("mysql://localhost/x")
    with pytest.raises(StoreUnavailableError, match="in-memory"):
        MemoryStore("sqlite://")
    with pytest.raises(StoreUnavailableError, match="cannot open the memory store"):
        MemoryStore("postgresql://nobody@127.0.0.1:1/none")
    not_a_db = tmp_path / "not.sqlite3"
    not_a_db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailableError):
        MemoryStore(not_a_db)
    store = MemoryStore(tmp_path / "ok.sqlite3")
    llm = tiny_llm()
    for bad in ("", "   ", "a\x00b", "x" * 300):
        with pytest.raises(InvalidInputError):
            store.open(llm, bad)
    with pytest.raises(UnknownUserError, match="ghost"):
        store.open(llm, "ghost", create=False)
    with pytest.raises(UnknownUserError):
        store.history("ghost")


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    store = MemoryStore(tmp_path / "s.sqlite3")
    with store.engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'from_the_future'"))
    with pytest.raises(StoreUnavailableError, match="newer mplus_agents"):
        MemoryStore(tmp_path / "s.sqlite3")


def test_migrations_build_exactly_the_orm_schema(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        assert ctx.get_current_revision() == head_revision()
        assert compare_metadata(ctx, Base.metadata) == []


CHILD_FULL_DISK = """
import resource, signal, sys
from mplus_agents.store.store import MemoryStore
from mplus_agents.store import StoreUnavailableError
from tests.test_store_support import TEXTS, tiny_llm

url, shards = sys.argv[1:3]
store = MemoryStore(url, shards, shard_bytes=1 << 30)
llm = tiny_llm()
mem = store.open(llm, "alice")
mem.inject_many(TEXTS * 40)  # a long-term store far larger than the file size limit below
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
try:
    mem.save()
except StoreUnavailableError as e:
    print("REFUSED", e)
else:
    print("SAVED")
"""


def test_full_disk_keeps_the_previous_snapshot(db_url: str, shard_dir: Path) -> None:
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm()
    mem = filled(llm, store, "alice", TEXTS[:2])
    mem.save()
    out = run_child(CHILD_FULL_DISK, db_url, str(shard_dir)).stdout
    assert "REFUSED" in out and "previous snapshot is intact" in out, out
    assert same_state(store.open(llm, "alice"), mem)
    assert [t.text for t in store.history("alice")] == TEXTS[:2]
    assert not [p for p in files_under(shard_dir) if p.name.endswith(".tmp")]


def test_safetensors_only_no_pickle(db_url: str, shard_dir: Path, tmp_path: Path) -> None:
    """A shard replaced by a valid safetensors file of another tensor fails the checksum, not later."""
    store = MemoryStore(db_url, shard_dir)
    llm = tiny_llm()
    filled(llm, store, "alice").save()
    victim = sorted(referenced(store))[0]
    save_file({"t": torch.zeros(3)}, str(victim))
    with pytest.raises(CorruptShardError):
        store.open(llm, "alice")
