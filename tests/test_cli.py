"""The `mplus` command, driven through typer's CliRunner on the embedded model (stdin in, text out)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mplus_agents import MemoryConfig, MPlusLLM
from mplus_agents.cli import app, paragraphs, pieces
from mplus_agents.statefile import load_memory, save_memory
from tests.conftest import CharTokenizer, tiny_llama

runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Keep the default memory file out of the real home directory."""
    path = tmp_path / "home"
    monkeypatch.setenv("MPLUS_HOME", str(path))
    return path


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def assert_clean_failure(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


# ---------------------------------------------------------------------------------------------- chat


@pytest.mark.slow
def test_chat_is_persistent_across_runs(tmp_path, smol) -> None:
    path = tmp_path / "chat.mplus"
    first = run(
        "chat", "--memory", str(path), "--max-new-tokens", "4",
        input="My name is Ada and my locker code is 4812.\nI moved to Lisbon in May.\n/stats\n",
    )  # fmt: skip
    assert first.exit_code == 0, first.output
    assert first.stdout.count("bot> ") == 2
    assert "tokens injected" in first.stdout  # the /stats table
    after_first = load_memory(smol, path).stats()
    expected = sum(
        len(smol.encode(smol.frame.render_item(t, "user")))
        for t in ("My name is Ada and my locker code is 4812.", "I moved to Lisbon in May.")
    )
    assert after_first.tokens_injected == expected, "exactly the two user messages are injected, not the replies"

    second = run("chat", "--memory", str(path), "--max-new-tokens", "4", input="What is my locker code?\n/quit\n")
    assert second.exit_code == 0, second.output
    assert f"{after_first.tokens_injected:,} tokens so far" in second.output
    after_second = load_memory(smol, path).stats()
    assert after_second.tokens_injected > after_first.tokens_injected
    assert after_second.injections > after_first.injections


@pytest.mark.slow
def test_chat_remember_replies_injects_the_replies_too(tmp_path, smol) -> None:
    path = tmp_path / "chat.mplus"
    message = "Please say hello to me."
    result = run("chat", "-m", str(path), "--max-new-tokens", "6", "--remember-replies", input=f"{message}\n")
    assert result.exit_code == 0, result.output
    reply = result.stdout.split("bot> ", 1)[1].split("\n", 1)[0].strip()
    assert reply, "the embedded model should say something"
    expected = len(smol.encode(smol.frame.render_item(message, "user"))) + len(
        smol.encode(smol.frame.render_item(reply, "assistant"))
    )
    assert load_memory(smol, path).stats().tokens_injected == expected


@pytest.mark.slow
def test_chat_defaults_to_a_file_under_mplus_home_and_no_save_writes_nothing(home) -> None:
    result = run("chat", "--max-new-tokens", "2", input="Remember that I like tea.\n")
    assert result.exit_code == 0, result.output
    default = home / "default.mplus"
    assert default.is_file()
    saved = default.read_bytes()

    result = run("chat", "--no-save", "--max-new-tokens", "2", input="And I dislike coffee.\n/stats\n")
    assert result.exit_code == 0, result.output
    assert "not saved" in result.output
    assert default.read_bytes() == saved
    assert [p.name for p in home.iterdir()] == ["default.mplus"]


@pytest.mark.slow
def test_chat_skips_blank_lines_and_survives_bad_messages(tmp_path) -> None:
    path = tmp_path / "chat.mplus"
    long = "word " * 9000
    result = run("chat", "-m", str(path), "--max-new-tokens", "2", input=f"\n   \n{'x' * 600_000}\n{long}\n/stats\n")
    assert result.exit_code == 0, result.output
    assert "600,000 characters" in result.output  # reported, and the chat went on
    assert "does not fit the model's 8,192 positions" in result.output
    assert "bot> " not in result.stdout
    assert "tokens injected" in result.stdout
    assert not path.exists(), "nothing was injected, so nothing was saved"


# ---------------------------------------------------------------------------------------------- inject, stats


@pytest.mark.slow
def test_inject_file_then_stats(tmp_path, smol) -> None:
    doc = tmp_path / "notes.txt"
    paras = [
        "The blue door opens at dawn.",
        "Bread is baked on Tuesdays\nand sold on Wednesdays.",
        "Owls nest in the barn.",
    ]
    doc.write_text("\n\n".join(paras) + "\n\n  \n", encoding="utf-8")
    path = tmp_path / "mem.mplus"
    result = run("inject", str(doc), "--memory", str(path))
    assert result.exit_code == 0, result.output
    assert "injected 3 paragraphs" in result.output
    expected = sum(len(smol.encode(smol.frame.render_item(p, None))) for p in paras)
    assert load_memory(smol, path).stats().tokens_injected == expected

    result = run("inject", str(doc), "--memory", str(path), "--role", "user")
    assert result.exit_code == 0, result.output
    expected += sum(len(smol.encode(smol.frame.render_item(p, "user"))) for p in paras)
    assert load_memory(smol, path).stats().tokens_injected == expected

    result = run("stats", "--memory", str(path))
    assert result.exit_code == 0, result.output
    assert "tokens injected" in result.stdout and f"{expected:,}" in result.stdout


def test_paragraph_splitting() -> None:
    assert paragraphs("a\nb\n\n\n c \n \t\nd\n") == ["a\nb", "c", "d"]
    assert paragraphs(" \n\n\t") == []
    long = "word " * 30
    assert all(len(p) <= 20 for p in pieces(long.strip(), 20))
    assert " ".join(pieces(long.strip(), 20)) == long.strip()
    assert pieces("x" * 45, 20) == ["x" * 20, "x" * 20, "x" * 5]


# ---------------------------------------------------------------------------------------------- bad input


def test_inject_missing_file(tmp_path) -> None:
    assert_clean_failure(run("inject", str(tmp_path / "absent.txt")), "no such file", "absent.txt")


@pytest.mark.parametrize("content", ["", " \n\n\t\n"], ids=["empty", "whitespace"])
def test_inject_empty_file(tmp_path, content) -> None:
    doc = tmp_path / "empty.txt"
    doc.write_text(content)
    assert_clean_failure(run("inject", str(doc), "-m", str(tmp_path / "m.mplus")), "empty", "empty.txt")
    assert not (tmp_path / "m.mplus").exists()


def test_inject_binary_file(tmp_path) -> None:
    doc = tmp_path / "blob.bin"
    doc.write_bytes(b"\xff\xfe\x00garbage\x80")
    assert_clean_failure(run("inject", str(doc)), "not UTF-8", "blob.bin")


def test_inject_bad_role(tmp_path) -> None:
    doc = tmp_path / "d.txt"
    doc.write_text("hello")
    assert_clean_failure(run("inject", str(doc), "--role", "robot"), "--role", "robot")


def test_stats_without_a_memory_file(tmp_path) -> None:
    assert_clean_failure(run("stats", "-m", str(tmp_path / "none.mplus")), "no memory file", "none.mplus")


@pytest.mark.slow
def test_memory_made_by_another_model_is_refused(tmp_path) -> None:
    llm = MPlusLLM(tiny_llama(), CharTokenizer(), MemoryConfig(pool_size=128, chunk_size=64))
    mem = llm.new_memory()
    mem.inject("made with a tiny random model", role="user")
    path = save_memory(mem, tmp_path / "tiny.mplus")
    before = path.read_bytes()
    assert_clean_failure(run("stats", "-m", str(path)), "was made with model", "inject")
    assert_clean_failure(run("chat", "-m", str(path)), "was made with model")
    assert path.read_bytes() == before, "a refused memory file is never overwritten"


@pytest.mark.slow
def test_corrupt_memory_file_is_refused(tmp_path, smol) -> None:
    mem = smol.new_memory()
    mem.inject("a short memory", role="user")
    path = save_memory(mem, tmp_path / "m.mplus")
    path.write_bytes(path.read_bytes()[:-100])
    assert_clean_failure(run("stats", "-m", str(path)), "m.mplus", "truncated or corrupted")


@pytest.mark.slow
def test_chat_with_user_keeps_memory_in_the_store(tmp_path, smol) -> None:
    store = str(tmp_path / "store.sqlite3")
    first = run("chat", "--user", "ada", "--store", store, "--max-new-tokens", "4", input="My locker code is 4812.\n")
    assert first.exit_code == 0, first.output
    history = run("history", "ada", "--store", store, "--json")
    assert history.exit_code == 0, history.output
    assert "My locker code is 4812." in history.stdout
    second = run("chat", "--user", "ada", "--store", store, "--max-new-tokens", "4", input="Where do I live?\n")
    assert second.exit_code == 0, second.output
    assert "user 'ada' in the store" in second.output
    users = run("users", "--store", store)
    assert users.exit_code == 0 and "ada" in users.stdout
    assert run("history", "ada", "--store", store, "--json").stdout.count("\n") >= 2


def test_model_option_opens_a_local_checkpoint(tmp_path, smol_tokenizer) -> None:
    """`mplus --model DIR` serves any local model directory; a missing one is a clear error, not a download."""
    from mplus_agents.checkpoints import save_checkpoint

    model = tiny_llama(vocab_size=len(smol_tokenizer), tie_word_embeddings=True)
    llm = MPlusLLM(model, smol_tokenizer, MemoryConfig(pool_size=64, chunk_size=32, min_chunk=8))
    ckpt = save_checkpoint(tmp_path / "tiny", llm)
    doc = tmp_path / "doc.txt"
    doc.write_text("The tiny model remembers this paragraph.\n")
    mem = tmp_path / "m.mplus"
    result = runner.invoke(app, ["--model", str(ckpt), "inject", str(doc), "--memory", str(mem)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["--model", str(ckpt), "stats", "--memory", str(mem)])
    assert result.exit_code == 0 and "tokens injected" in result.output.lower()
    # The memory was written by the tiny model: the embedded default refuses it by name.
    result = runner.invoke(app, ["stats", "--memory", str(mem)])
    assert result.exit_code != 0 and "model" in result.output.lower()
    result = runner.invoke(app, ["--model", str(tmp_path / "nowhere"), "stats", "--memory", str(mem)])
    assert result.exit_code != 0 and "not a local model directory" in result.output
