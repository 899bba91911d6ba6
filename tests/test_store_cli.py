"""`mplus users | history | export | forget | delete-user` on a Typer app, as `mplus` wires them in."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from mplus_agents.store.cli_commands import open_user_memory, register
from mplus_agents.store.store import MemoryStore
from tests.test_store_support import TEXTS, db_url, one_thread, pg_database, same_state, shard_dir, tiny_llm

FIXTURES = (db_url, one_thread, pg_database, shard_dir)


def make_app() -> typer.Typer:
    app = typer.Typer()
    register(app, load_llm=tiny_llm)
    return app


def test_store_commands(db_url: str, shard_dir: Path, tmp_path: Path) -> None:
    app, runner = make_app(), CliRunner()
    opts = ["--store", db_url, "--shards", str(shard_dir)]

    result = runner.invoke(app, ["users", *opts])
    assert result.exit_code == 0 and "no stored memories" in result.output

    llm = tiny_llm()
    mem = open_user_memory(llm, "alice", db_url, str(shard_dir))  # what `mplus chat --user alice` does
    for text in TEXTS[:3]:
        mem.inject(text, role="user")
    mem.save()
    mem = open_user_memory(llm, "alice", db_url, str(shard_dir))  # the next run finds it
    assert [t.text for t in mem.history()] == TEXTS[:3]

    result = runner.invoke(app, ["users", *opts])
    assert result.exit_code == 0 and "alice" in result.output

    result = runner.invoke(app, ["history", "alice", *opts, "--json"])
    assert result.exit_code == 0
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["text"] for r in rows] == TEXTS[:3] and all(r["role"] == "user" for r in rows)
    result = runner.invoke(app, ["history", "alice", *opts])
    assert result.exit_code == 0 and "Lisbon" in result.output

    result = runner.invoke(app, ["export", "alice", str(tmp_path / "alice.export"), *opts])
    assert result.exit_code == 0 and (tmp_path / "alice.export" / "manifest.json").is_file()

    result = runner.invoke(app, ["forget", "alice", str(rows[1]["id"]), *opts])
    assert result.exit_code == 0, result.output
    store = MemoryStore(db_url, shard_dir)
    assert [t.text for t in store.history("alice")] == [TEXTS[0], TEXTS[2]]
    expected = llm.new_memory()
    expected.inject(TEXTS[0], role="user")
    expected.inject(TEXTS[2], role="user")
    assert same_state(store.open(llm, "alice"), expected)

    result = runner.invoke(app, ["forget", "alice", "999999", *opts])
    assert result.exit_code == 1 and "error:" in result.output and "999999" in result.output

    result = runner.invoke(app, ["delete-user", "alice", *opts], input="n\n")
    assert result.exit_code == 1 and [u.user_id for u in store.users()] == ["alice"]
    result = runner.invoke(app, ["delete-user", "alice", "--yes", *opts])
    assert result.exit_code == 0 and store.users() == []

    for command in (["history", "alice"], ["delete-user", "alice", "-y"], ["forget", "alice", "1"]):
        result = runner.invoke(app, [*command, *opts])
        assert result.exit_code == 1 and "no memory is stored for user 'alice'" in result.output


def test_bad_store_url_is_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(make_app(), ["users", "--store", "sqlite:////no/such/dir/x.sqlite3"])
    assert result.exit_code == 1 and "error:" in result.output and "Traceback" not in result.output
