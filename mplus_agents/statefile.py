"""One latent memory in one safetensors file: the format behind `mplus chat --memory PATH` (DESIGN 6).

The SQL-backed `MemoryStore` is the multi-user home for memories; this file format is the simplest durable
unit: everything a `LatentMemory` holds (`MemoryState.tensors()` plus the pending token ids) and, in the
safetensors metadata, the `MemoryConfig`, a fingerprint of the model that made it, the library version and
the format version. No pickle: safetensors holds raw tensors and a JSON header, nothing executable.

Writes are crash-safe: the file is written beside its destination under a temporary name, fsynced and
renamed over the old one, so a reader sees either the previous memory or the new one, never half of each.
A sha256 of every tensor's bytes is kept in the metadata, because safetensors itself notices a truncated file
but not flipped bytes.

Latent memory is only meaningful to the model that wrote it (its keys and values live in that model's
attention space), so loading checks the fingerprint and refuses another model with `MemoryMismatchError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mplus_agents import __version__
from mplus_agents.config import MemoryConfig
from mplus_agents.errors import MemoryMismatchError, MPlusError
from mplus_agents.filemap import (
    Entry,
    MappedFileError,
    Spill,
    iter_bytes,
    map_safetensors,
    read_header,
    tensor_chunks,
    write_safetensors,
)
from mplus_agents.fsutil import fsync_dir
from mplus_agents.memory import LatentMemory
from mplus_agents.model import MPlusLLM
from mplus_agents.state import MemoryState
from mplus_agents.store.fingerprint import differences, model_fingerprint

FORMAT = "mplus-memory"
FORMAT_VERSION = 1
PENDING_KEY = "pending"
SUFFIX = ".mplus"



class MemoryFileError(MPlusError, ValueError):
    """A memory file that cannot be read: truncated, corrupted, not a memory file, or from a newer format."""


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu")
        h.update(f"{name}:{t.dtype}:{list(t.shape)}\n".encode())
        for chunk in tensor_chunks(t):
            h.update(chunk)
    return h.hexdigest()


def _portable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On the CPU; views are kept as they are (`write_safetensors` writes them layer by layer, uncopied)."""
    return {name: t.detach().to("cpu") for name, t in tensors.items()}


def save_memory(memory: LatentMemory, path: str | Path) -> Path:
    """Write `memory` to `path` atomically; returns the path written."""
    path = Path(path).expanduser()
    with memory.lock:
        state, pending = memory.state, list(memory.pending)
        tensors = dict(state.tensors(contiguous=False))
    tensors[PENDING_KEY] = torch.tensor(pending, dtype=torch.int64)
    tensors = _portable(tensors)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "library_version": __version__,
        "memory_config": state.config.to_json(),
        "model": json.dumps(model_fingerprint(memory.llm), sort_keys=True),
        "user_id": memory.user_id or "",
        "sha256": _tensors_sha256(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with open(tmp, "wb") as f:
            write_safetensors(f, tensors, metadata)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise MemoryFileError(f"{path} is not a readable memory file (truncated or corrupted?): {e}") from e
    return metadata, tensors


def _map(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor], dict[str, Entry]]:
    try:
        _, entries = read_header(path)
        metadata, tensors = map_safetensors(path)
    except (MappedFileError, OSError, RuntimeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise MemoryFileError(f"{path} is not a readable memory file (truncated or corrupted?): {e}") from e
    return metadata, tensors, entries


def _streamed_sha256(path: Path, entries: dict[str, Entry]) -> str:
    """`_tensors_sha256` of a file's tensors, computed from plain reads so a mapped load stays unpaged."""
    h = hashlib.sha256()
    for name in sorted(entries):
        e = entries[name]
        h.update(f"{name}:{e.dtype}:{e.shape}\n".encode())
        for chunk in iter_bytes(path, e):
            h.update(chunk)
    return h.hexdigest()


def _check_model(path: Path, saved: dict[str, Any], llm: MPlusLLM) -> None:
    current = model_fingerprint(llm)
    differ = differences(saved, current)
    if differ:
        details = ", ".join(differ)
        raise MemoryMismatchError(
            f"{path} was made with model {saved.get('name')!r}, not with the loaded model {current['name']!r} "
            f"({details}). Latent memory only works with the model that wrote it; rebuild it by injecting the "
            "original text again with this model (for example `mplus inject FILE --memory NEW_PATH`)."
        )


def load_memory(
    llm: MPlusLLM,
    path: str | Path,
    *,
    user_id: str | None = None,
    mmap: bool = False,
    spill_dir: str | Path | None = None,
    verify: bool = True,
    read_config: MemoryConfig | None = None,
) -> LatentMemory:
    """Read a memory written by `save_memory` for `llm`.

    `read_config` reads it with other read-time settings (`LatentMemory.use_config`; MemoryMismatchError if
    it would change what is stored); by default the saved config.

    With `mmap=True` the tensors stay in the file (copy-on-write mapped, paged in when a read touches them;
    `mplus_agents.filemap`), and the long-term store grows after the load in unlinked spill files under
    `spill_dir` (default: the memory file's directory; keep it off tmpfs), so a store larger than RAM can be
    loaded, read and extended. This holds while the file's dtypes are the ones the model reads (a float32 file
    read by a bfloat16 model is converted into RAM). The checksum is then computed from plain reads, which go
    through the page cache but not into this process's memory; `verify=False` skips it (a sequential read of
    the whole file) and trusts the file.

    Raises `FileNotFoundError` if there is no file, `MemoryFileError` if it is damaged or not a memory file,
    and `MemoryMismatchError` if another model wrote it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no memory file at {path}")
    entries: dict[str, Entry] = {}
    if mmap:
        metadata, tensors, entries = _map(path)
    else:
        metadata, tensors = _read(path)
    if metadata.get("format") != FORMAT:
        raise MemoryFileError(f"{path} is a safetensors file but not an mplus_agents memory")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise MemoryFileError(f"{path} has no valid format_version") from None
    if version > FORMAT_VERSION:
        raise MemoryFileError(
            f"{path} uses memory format {version}, made by mplus_agents {metadata.get('library_version')}; "
            f"this is {__version__} (format {FORMAT_VERSION}): upgrade mplus_agents to read it"
        )
    if verify and metadata.get("sha256") != (_streamed_sha256(path, entries) if mmap else _tensors_sha256(tensors)):
        raise MemoryFileError(f"{path} is corrupted: its tensors do not match the checksum written with them")
    try:
        saved_model = json.loads(metadata["model"])
        config = MemoryConfig.from_json(metadata["memory_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise MemoryFileError(f"{path} has unreadable metadata: {e}") from e
    _check_model(path, saved_model, llm)
    pending = tensors.pop(PENDING_KEY, torch.zeros(0, dtype=torch.int64))
    try:
        state = MemoryState.from_tensors(config, tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise MemoryFileError(f"{path} does not hold a complete memory: {e}") from e
    template = llm.empty_state(config)
    try:
        fitted = state.fitted_to(template)
    except ValueError as e:
        raise MemoryFileError(f"{path}: {e}") from e
    if mmap:
        spill = Spill(Path(spill_dir).expanduser() if spill_dir is not None else path.parent)
        fitted = dataclasses.replace(fitted, ltm=fitted.ltm.spilled(spill.empty))
    memory = LatentMemory(llm, config, fitted, user_id=user_id or metadata.get("user_id") or None)
    if read_config is not None and read_config != config:
        memory.use_config(read_config)
    memory.pending = [int(i) for i in pending.tolist()]
    return memory
