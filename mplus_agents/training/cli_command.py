"""`mplus train FILES... --out DIR`: the CLI face of `mplus_agents.training.train` (here, so cli.py stays small)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mplus_agents.errors import MPlusError


def register(app: typer.Typer) -> None:
    app.command(name="train")(train_command)


def train_command(
    files: Annotated[list[Path], typer.Argument(help="UTF-8 text files: blank lines separate documents, one "
                                                "segment (turn) per line, `Q: ...` lines ask about the line before")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory (a checkpoint for from_pretrained)")],
    base_model: Annotated[Path | None, typer.Option(help="local HF model dir (default: embedded SmolLM2)")] = None,
    source: Annotated[str, typer.Option(help="memory source the retriever serves: input or output")] = "input",
    memory_config: Annotated[Path | None, typer.Option(help="MemoryConfig JSON (default: MemoryConfig())")] = None,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 400,
    lr: Annotated[float, typer.Option(help="retriever learning rate (AdamW)")] = 1e-4,
    batch: Annotated[int, typer.Option(help="queries per step")] = 8,
    dim: Annotated[int, typer.Option(help="projector output width")] = 256,
    seed: Annotated[int, typer.Option(help="seeds data order, sampling and initialisation")] = 0,
    save_every: Annotated[int, typer.Option(help="steps between resumable checkpoints")] = 100,
    role: Annotated[str, typer.Option(help="inject lines as 'user' turns or 'none' (documents)")] = "user",
    next_prob: Annotated[float, typer.Option(help="share of lines that become next-sentence queries")] = 0.15,
    resume: Annotated[bool, typer.Option("--resume", help="continue the unfinished run in --out")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
) -> None:
    """Co-train the retriever (SPEC 5.1-5.3) on your text and save a checkpoint that scores with it."""
    import torch

    from mplus_agents.config import MemoryConfig
    from mplus_agents.model import MPlusLLM
    from mplus_agents.training import CollectOptions, TrainOptions, train

    err = Console(stderr=True, highlight=False, soft_wrap=True)

    def fail(message: str) -> typer.Exit:
        err.print(f"[bold red]error:[/] {escape(message)}")
        return typer.Exit(1)

    if source not in ("input", "output"):
        raise fail(f"--source must be 'input' or 'output', got {source!r}")
    if role not in ("user", "none"):
        raise fail(f"--role must be 'user' or 'none', got {role!r}")
    if threads:
        torch.set_num_threads(threads)
    try:
        if memory_config is not None:
            config = MemoryConfig.from_json(memory_config.read_text())
        elif source == "output":
            config = MemoryConfig(source="output", tokens_per_chunk=64, pool_size=2048, drop_policy="random",
                                  selection="per_layer", block_size=1, retrieve_tokens=512)
        else:
            config = MemoryConfig()
        if config.source != source:
            raise fail(f"--source {source} but the memory config says {config.source!r}")
        for f in files:  # checked before the model loads, so a typo fails fast
            if not f.is_file():
                raise fail(f"no such training file: {f}")
        if base_model is None:
            llm = MPlusLLM.from_default(config=config)
            name = llm.name
        else:
            llm = MPlusLLM.from_pretrained(base_model, config=config)
            name = str(base_model)
        options = TrainOptions(steps=steps, lr=lr, batch=batch, dim=dim, seed=seed, save_every=save_every)
        copts = CollectOptions(layers=(), seed=seed, next_prob=next_prob, role=None if role == "none" else role)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err) as bar:
            tasks: dict[str, TaskID] = {}

            def progress(phase: str, done: int, total: int, loss: float | None) -> None:
                if not err.is_terminal and (done == total or done % max(1, total // 20) == 0):
                    err.print(f"{phase} {done}/{total} {'' if loss is None else f'loss {loss:.4f}'}")  # logs
                if phase not in tasks:
                    label = "reading text into memory" if phase == "collect" else "training retriever"
                    tasks[phase] = bar.add_task(label, total=total, loss="")
                shown = f"loss {loss:.4f}" if loss is not None else ""
                bar.update(tasks[phase], completed=done, total=total, loss=shown)

            result = train(llm, files, out, config=config, collect_options=copts, options=options, resume=resume,
                           progress=progress, base_model=name)
    except (MPlusError, OSError, ValueError, json.JSONDecodeError) as e:
        raise fail(str(e)) from None
    err.print(
        f"trained {result.steps} steps on {result.examples} queries over {result.memory_tokens:,} memory tokens "
        f"(reading {result.seconds_collect:.0f} s, training {result.seconds_train:.0f} s); wrote {out}"
    )
