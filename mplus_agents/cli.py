"""The `mplus` command: chat with latent memory, inject files, show what a memory holds (issue 2, item 5).

Every command works on one memory file (`mplus_agents.statefile`). By default that is
`$MPLUS_HOME/default.mplus` (`MPLUS_HOME` defaults to `$XDG_DATA_HOME/mplus_agents`, i.e.
`~/.local/share/mplus_agents`), so `mplus chat` alone remembers across runs; `--memory PATH` picks another
file and `chat --no-save` keeps nothing.

Each command is one small function over three helpers (`load_llm`, `open_memory`, `save`), so new options
such as a per-user SQL store slot in without touching the loops. Bad input ends with a one-line message on
stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mplus_agents.errors import InvalidInputError, MPlusError
from mplus_agents.memory import InjectReport, LatentMemory, MemoryStats
from mplus_agents.model import MPlusLLM
from mplus_agents.store.cli_commands import StoreOption, open_user_memory
from mplus_agents.store.cli_commands import register as register_store_commands
from mplus_agents.training.cli_command import register as register_train_command

app = typer.Typer(
    help="Chat with an LLM whose memory of the conversation lives in its attention keys and values (M+).\n\n"
    "Memories are files; the default is $MPLUS_HOME/default.mplus (MPLUS_HOME: ~/.local/share/mplus_agents).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

DEFAULT_FILE = "default.mplus"
QUIT_COMMANDS = ("/quit", "/exit")
MODEL_ENV = "MPLUS_MODEL"
_model_dir: str | None = None
"""The `--model` of the running command (None: the embedded default)."""


@app.callback()
def global_options(
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            envvar=MODEL_ENV,
            help="Local model directory: a Hugging Face model or an M+ checkpoint (mplus-8b, memoryllm-8b, or what "
            "`mplus train` saved). Default: the embedded SmolLM2-135M-Instruct.",
        ),
    ] = None,
) -> None:
    """Global options, read before any command runs (typer fills `model` from $MPLUS_MODEL too)."""
    global _model_dir
    _model_dir = str(model) if model is not None else None


def data_dir() -> Path:
    home = os.environ.get("MPLUS_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "mplus_agents"


def default_memory_path() -> Path:
    return data_dir() / DEFAULT_FILE


def out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str) -> typer.Exit:
    err().print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(1)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause and fix into `error: ...` and exit code 1."""
    try:
        yield
    except (MPlusError, OSError) as e:
        raise fail(str(e)) from None


# ---------------------------------------------------------------------------------------------- helpers


def load_llm() -> MPlusLLM:
    """The model of `--model` / $MPLUS_MODEL, else the embedded SmolLM2."""
    return _load_llm(_model_dir)


@functools.cache
def _load_llm(model_dir: str | None) -> MPlusLLM:
    """Cached per directory: tests drive several commands in one process."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if model_dir is None:
        return MPlusLLM.from_default()
    return MPlusLLM.from_pretrained(Path(model_dir).expanduser())


def open_memory(llm: MPlusLLM, path: Path | None) -> LatentMemory:
    """The memory saved at `path` if there is one, else a fresh one (saved there on the first save)."""
    if path is not None and path.exists():
        from mplus_agents.statefile import load_memory

        return load_memory(llm, path)
    return llm.new_memory()


def save(memory: LatentMemory, path: Path | None) -> None:
    if path is not None:
        from mplus_agents.statefile import save_memory

        save_memory(memory, path)


def resolve(path: Path | None) -> Path:
    return (path or default_memory_path()).expanduser()


def stats_table(stats: MemoryStats, title: str | None = None) -> Table:
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("short-term tokens", f"{stats.pool_tokens:,} / {stats.pool_capacity:,}")
    table.add_row("long-term tokens", f"{stats.long_term_tokens:,}")
    table.add_row("  of which staged", f"{stats.staging_tokens:,}")
    table.add_row("injections (chunks)", f"{stats.injections:,}")
    table.add_row("tokens injected", f"{stats.tokens_injected:,}")
    table.add_row("pending tokens", f"{stats.pending_tokens:,}")
    table.add_row("size", f"{stats.bytes / 2**20:,.1f} MiB")
    return table


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each stripped; empty ones dropped."""
    return [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def pieces(text: str, limit: int) -> list[str]:
    """Split a paragraph longer than `limit` characters at whitespace (hard cut if there is none)."""
    out: list[str] = []
    while len(text) > limit:
        cut = text.rfind(" ", 0, limit)
        cut = cut if cut > 0 else limit
        out.append(text[:cut].strip())
        text = text[cut:].strip()
    if text:
        out.append(text)
    return [p for p in out if p]


def read_input(prompt: str, reader: Callable[[str], str]) -> str | None:
    """One line from the user, or None at end of input."""
    try:
        return reader(prompt)
    except EOFError:
        return None


# ---------------------------------------------------------------------------------------------- commands

MemoryOption = Annotated[
    Path | None,
    typer.Option(
        "--memory",
        "-m",
        help="Memory file. [default: $MPLUS_HOME/default.mplus]",
        dir_okay=False,
    ),
]


@app.command()
def chat(
    memory: MemoryOption = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest reply, in tokens.")] = 256,
    remember_replies: Annotated[
        bool, typer.Option(help="Inject the assistant's replies too, not only your messages.")
    ] = False,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy decoding.")] = 0.0,
    no_save: Annotated[
        bool, typer.Option("--no-save", help="Ephemeral chat: read the memory, never write it.")
    ] = False,
    user: Annotated[
        str | None, typer.Option("--user", "-u", help="Keep this user's memory in the SQL store instead of a file.")
    ] = None,
    store: StoreOption = None,
) -> None:
    """Chat on the embedded model with latent memory.

    Each message is answered with only that message in the prompt, then injected into memory and saved.

    /stats shows the memory; /quit or end of input leaves.
    """
    path = resolve(memory)
    console, errors = out(), err()
    with user_errors():
        llm = load_llm()
        mem = open_user_memory(llm, user, store) if user else open_memory(llm, path)
    target = None if no_save else path
    if user:
        where = f"user {user!r} in the store" + (" (not saved)" if no_save else "")
    else:
        where = "not saved" if target is None else f"saved to {target}"
    tokens = mem.stats().tokens_injected
    errors.print(f"[dim]{escape(llm.name)}, memory {escape(where)}: {tokens:,} tokens so far. /stats, /quit[/]")
    while True:
        line = read_input("you> ", console.input)
        if line is None:
            console.print()
            break
        message = line.strip()
        if not message:
            continue
        if message in QUIT_COMMANDS:
            break
        if message == "/stats":
            console.print(stats_table(mem.stats()))
            continue
        try:
            check_message(llm, message, max_new_tokens)
            reply = _reply(llm, mem, message, max_new_tokens, temperature, console)
            texts, roles = [message], ["user"]
            if remember_replies and reply.strip():
                texts.append(reply.strip())
                roles.append("assistant")
            mem.inject_many(texts, roles=roles)
            if user:
                if not no_save:
                    mem.save()
            else:
                save(mem, target)
        except (MPlusError, OSError) as e:  # the turn is refused or not saved; the chat goes on
            errors.print(f"[bold red]error:[/] {escape(str(e))}")


def check_message(llm: MPlusLLM, message: str, max_new_tokens: int) -> None:
    """Refuse a message the model cannot read in one prompt before spending minutes on it."""
    if len(message) > LatentMemory.max_chars_per_call:
        raise InvalidInputError(
            f"the message has {len(message):,} characters, more than {LatentMemory.max_chars_per_call:,}; "
            "put long texts into memory with `mplus inject FILE`"
        )
    window = getattr(getattr(llm.model, "config", None), "max_position_embeddings", None)
    if isinstance(window, int):
        tokens = len(llm.encode(message))
        if tokens + max_new_tokens > window:
            raise InvalidInputError(
                f"the message is {tokens:,} tokens; with --max-new-tokens {max_new_tokens} it does not fit the "
                f"model's {window:,} positions. Put long texts into memory with `mplus inject FILE`"
            )


def _reply(
    llm: MPlusLLM, mem: LatentMemory, message: str, max_new_tokens: int, temperature: float, console: Console
) -> str:
    console.print("bot> ", end="")
    parts: list[str] = []
    stream = llm.chat(message, memory=mem, max_new_tokens=max_new_tokens, stream=True, temperature=temperature)
    for piece in stream:
        parts.append(piece)
        console.out(piece, end="", highlight=False)
    console.print()
    return "".join(parts)


@app.command()
def inject(
    file: Annotated[Path, typer.Argument(help="A UTF-8 text file; blank lines separate paragraphs.")],
    memory: MemoryOption = None,
    role: Annotated[
        str, typer.Option(help="'user' quotes each paragraph as something you said; 'none' as a document.")
    ] = "none",
) -> None:
    """Inject a text file into memory (paragraphs, one atomic update), then save."""
    path = resolve(memory)
    if role not in ("user", "none"):
        raise fail(f"--role must be 'user' or 'none', got {role!r}")
    with user_errors():
        text = _read_text(file)
        texts = [p for para in paragraphs(text) for p in pieces(para, LatentMemory.max_chars_per_call)]
        if not texts:
            raise fail(f"{file} is empty or holds only whitespace; nothing to inject")
        llm = load_llm()
        mem = open_memory(llm, path)
        start = time.perf_counter()
        report = _inject_with_progress(mem, texts, None if role == "none" else role)
        seconds = time.perf_counter() - start
        save(mem, path)
    rate = report.tokens / seconds if seconds > 0 else 0.0
    err().print(
        f"injected {len(texts):,} paragraphs, {report.tokens:,} tokens in {report.chunks:,} chunks "
        f"({seconds:.1f} s, {rate:,.0f} tokens/s) into {path}"
    )


def _read_text(file: Path) -> str:
    if not file.exists():
        raise fail(f"no such file: {file}")
    if file.is_dir():
        raise fail(f"{file} is a directory, not a text file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"{file} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def _inject_with_progress(mem: LatentMemory, texts: list[str], role: str | None) -> InjectReport:
    columns = (TextColumn("injecting"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeElapsedColumn())
    with Progress(*columns, console=err(), transient=False) as progress:
        task = progress.add_task("inject", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return mem.inject_many(texts, roles=[role] * len(texts), progress=advance)


@app.command()
def stats(memory: MemoryOption = None) -> None:
    """Show what a memory file holds."""
    path = resolve(memory)
    with user_errors():
        if not path.exists():
            raise fail(f"no memory file at {path} (`mplus chat` or `mplus inject FILE` creates one)")
        llm = load_llm()
        mem = open_memory(llm, path)
    out().print(stats_table(mem.stats(), title=str(path)))


register_store_commands(app)
register_train_command(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
