"""`mplus users | history | export | forget | delete-user`: the store's commands (issue 3, item 6).

`register(app)` adds them to the `mplus` Typer app; `open_user_memory` is what `mplus chat --user USER`
calls to get a memory that `save()` keeps across runs. Every command takes `--store URL` (or
`MPLUS_STORE_URL`) and `--shards DIR_OR_URL` (or `MPLUS_SHARDS`); the default is the SQLite store under
`$MPLUS_HOME`. Only `forget` loads a model (it rebuilds the latent state); the others read rows and files.
Errors a user can fix print one line on stderr and exit with code 1.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mplus_agents.errors import MPlusError

if TYPE_CHECKING:
    from mplus_agents.memory import LatentMemory
    from mplus_agents.model import MPlusLLM
    from mplus_agents.store.store import MemoryStore

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="MPLUS_STORE_URL",
        help="Database URL or SQLite file (default: $MPLUS_HOME/store.sqlite3).",
        show_default=False,
    ),
]
ShardsOption = Annotated[
    str | None,
    typer.Option(
        "--shards",
        envvar="MPLUS_SHARDS",
        help="Directory or fsspec URL of the tensor shards (default: beside the SQLite file).",
        show_default=False,
    ),
]
PREVIEW_CHARS = 80


def open_store(url: str | None = None, shards: str | None = None) -> MemoryStore:
    from mplus_agents.store.store import MemoryStore

    return MemoryStore(url, shards)


def open_user_memory(
    llm: MPlusLLM, user_id: str, store_url: str | None = None, shards: str | None = None
) -> LatentMemory:
    """The memory `mplus chat --user USER` works on: call `.save()` after each exchange."""
    return open_store(store_url, shards).open(llm, user_id)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except (MPlusError, FileNotFoundError, PermissionError) as e:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(1) from None


def _default_llm() -> MPlusLLM:
    from mplus_agents.cli import load_llm

    return load_llm()


def _preview(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1] + "…"


def register(app: typer.Typer, *, load_llm: Callable[[], MPlusLLM] | None = None) -> None:
    """Add the store commands to `app`. `load_llm` (default: the CLI's embedded model) serves `forget`."""
    get_llm = load_llm or _default_llm

    @app.command("users")
    def users(store: StoreOption = None, shards: ShardsOption = None) -> None:
        """List the users that have a stored memory."""
        out = Console(highlight=False, soft_wrap=True)
        with _user_errors():
            rows = open_store(store, shards).users()
        table = Table(box=None, pad_edge=False)
        for name, justify in (("user", "left"), ("turns", "right"), ("tokens", "right"), ("size", "right"),
                              ("updated (UTC)", "left"), ("model", "left")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for u in rows:
            table.add_row(
                escape(u.user_id), f"{u.turns:,}", f"{u.tokens_injected:,}", f"{u.nbytes / 2**20:,.1f} MiB",
                u.updated_at.strftime("%Y-%m-%d %H:%M:%S"), escape(u.model_name),
            )
        if rows:
            out.print(table)
        else:
            out.print("no stored memories")

    @app.command("history")
    def history(
        user: Annotated[str, typer.Argument(help="User id.")],
        store: StoreOption = None,
        shards: ShardsOption = None,
        full: Annotated[bool, typer.Option("--full", help="Print whole texts, not one-line previews.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON object per turn.")] = False,
    ) -> None:
        """Show what a user's memory holds: every injected turn, with the id `forget` takes."""
        out = Console(highlight=False, soft_wrap=True)
        with _user_errors():
            turns = open_store(store, shards).history(user)
        if as_json:
            for t in turns:
                typer.echo(json.dumps({"id": t.id, "role": t.role, "tokens": t.tokens, "created_at":
                                       t.created_at.isoformat(), "text": t.text}, ensure_ascii=False))
            return
        if not turns:
            out.print(f"user {escape(user)!r} has a memory with no turns")
            return
        table = Table(box=None, pad_edge=False)
        for name in ("id", "time (UTC)", "role", "tokens", "text"):
            table.add_column(name, justify="right" if name in ("id", "tokens") else "left",
                             overflow="fold" if full else "ellipsis")
        for t in turns:
            table.add_row(str(t.id), t.created_at.strftime("%Y-%m-%d %H:%M:%S"), escape(t.role or "-"),
                          f"{t.tokens:,}", escape(t.text if full else _preview(t.text)))
        out.print(table)

    @app.command("export")
    def export(
        user: Annotated[str, typer.Argument(help="User id.")],
        path: Annotated[Path, typer.Argument(help="New directory to write (ledger.jsonl, shards/, manifest).")],
        store: StoreOption = None,
        shards: ShardsOption = None,
    ) -> None:
        """Write a user's memory to a directory that `MemoryStore.import_` reads back."""
        with _user_errors():
            written = open_store(store, shards).export(user, path)
        Console(stderr=True, highlight=False).print(f"exported {escape(user)!r} to {escape(str(written))}")

    @app.command("forget")
    def forget(
        user: Annotated[str, typer.Argument(help="User id.")],
        turns: Annotated[list[int], typer.Argument(help="Turn ids from `mplus history USER`.")],
        store: StoreOption = None,
        shards: ShardsOption = None,
    ) -> None:
        """Remove turns and rebuild the user's latent memory from the rest (loads the model)."""
        with _user_errors():
            st = open_store(store, shards)
            st.history(user)  # unknown user: fail before loading a model
            st.forget(get_llm(), user, turns)
        Console(stderr=True, highlight=False).print(
            f"forgot {len(turns)} turn(s) of {escape(user)!r}; its memory was rebuilt from the remaining ones"
        )

    @app.command("delete-user")
    def delete_user(
        user: Annotated[str, typer.Argument(help="User id.")],
        yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
        store: StoreOption = None,
        shards: ShardsOption = None,
    ) -> None:
        """Delete a user's memory: ledger, snapshots and shard files."""
        with _user_errors():
            st = open_store(store, shards)
            n = len(st.history(user))
            if not yes and not typer.confirm(f"Delete the memory of {user!r} ({n} turns)? This cannot be undone"):
                raise typer.Exit(1)
            st.delete_user(user)
        Console(stderr=True, highlight=False).print(f"deleted the memory of {escape(user)!r}")
