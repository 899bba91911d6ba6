"""Export and import of one user's memory as a plain directory (DESIGN 6).

    manifest.json      format, user id, model fingerprint, memory config, counters, the list of pieces
    ledger.jsonl       one injected turn per line: seq, batch, role, text, tokens, created_at
    shards/<sha256>.safetensors   one tensor per file, named by the sha256 of the file's bytes

Everything is readable without mplus_agents (JSON and safetensors). Import verifies every file against its
sha256 and the manifest's dtype and shape before anything is committed, and never overwrites an existing
user unless asked to. The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mplus_agents.config import MemoryConfig
from mplus_agents.errors import InvalidInputError, MPlusError
from mplus_agents.memory import LatentMemory, Turn
from mplus_agents.model import validate_user_id
from mplus_agents.state import MemoryState
from mplus_agents.store import shards as sh
from mplus_agents.store.errors import CorruptShardError, UnknownUserError, UserExistsError

if TYPE_CHECKING:
    from mplus_agents.store.store import MemoryStore

FORMAT = "mplus-memory-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LEDGER = "ledger.jsonl"
SHARDS = "shards"


class ExportFormatError(MPlusError, ValueError):
    """A directory that is not a complete, intact export."""


def _counters(state_or_snapshot: Any) -> dict[str, int]:
    return {
        "injections": int(state_or_snapshot.injections),
        "tokens_injected": int(state_or_snapshot.tokens_injected),
        "next_block": int(state_or_snapshot.next_block),
        "since_merge": int(state_or_snapshot.since_merge),
    }


def _turn_json(t: Turn, seq: int) -> str:
    return json.dumps(
        {
            "seq": seq,
            "batch": t.batch,
            "role": t.role,
            "text": t.text,
            "tokens": t.tokens,
            "created_at": t.created_at.isoformat(),
        },
        ensure_ascii=False,
    )


def _write_dir(
    path: Path,
    manifest: dict[str, Any],
    turns: list[Turn],
    files: list[tuple[str, sh.Encoded]] | None = None,
    read: Any = None,
) -> Path:
    path = path.expanduser()
    if path.exists():
        raise InvalidInputError(f"{path} already exists; export writes a new directory")
    if not path.parent.is_dir():
        raise InvalidInputError(f"directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        (tmp / SHARDS).mkdir(parents=True)
        with open(tmp / LEDGER, "w", encoding="utf-8") as f:
            for i, t in enumerate(turns, start=1):
                f.write(_turn_json(t, i) + "\n")
        for name, data in files or []:
            with open(tmp / SHARDS / name, "wb") as f:
                for part in data.parts:
                    f.write(part)
        if read is not None:
            read(tmp / SHARDS)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def export_memory(memory: LatentMemory, path: Path) -> Path:
    """`LatentMemory.export`: the memory as it is in this process (unsaved turns included)."""
    from mplus_agents import __version__
    from mplus_agents.store.fingerprint import model_fingerprint

    with memory.lock:
        state, pending = memory.state, list(memory.pending)
    turns = memory.history()
    pieces = sh.plan(state, pending)
    files: dict[str, sh.Encoded] = {}
    entries = []
    for p in pieces:
        data = sh.encode(p.tensor)
        digest = data.sha256()
        files[digest + sh.SUFFIX] = data
        entries.append(_entry(p.kind, p.start, p.stop, digest, p.tensor))
    manifest = _manifest(
        memory.user_id, model_fingerprint(memory.llm), memory.config, _counters(state), entries, len(turns),
        __version__,
    )
    return _write_dir(path, manifest, turns, list(files.items()))


def export_stored(store: MemoryStore, user_id: str, path: Path) -> Path:
    """`MemoryStore.export`: the user's saved head snapshot and ledger, copied and verified shard by shard."""
    from mplus_agents import __version__

    with store._user_lock(user_id):
        head = store._head(user_id)
        if head is None:
            raise UnknownUserError(user_id)
        turns = store._saved_turns(head.memory_pk)
        entries = []
        for link, shard in head.pieces:
            entries.append(
                {"kind": link.kind, "start": link.start, "stop": link.stop, "sha256": shard.sha256,
                 "dtype": shard.dtype, "shape": json.loads(shard.shape)}
            )
        counters = _counters(head.snapshot) if head.snapshot is not None else None

        def copy(into: Path) -> None:
            for link, shard in head.pieces:
                target = into / (shard.sha256 + sh.SUFFIX)
                if target.exists():
                    continue
                store._read_piece(head, link, shard, user_id)  # verifies path, sha256, dtype and shape
                target.write_bytes(store.storage.read(shard.path))

        manifest = _manifest(user_id, head.fingerprint, head.config, counters, entries, len(turns), __version__)
        return _write_dir(path, manifest, turns, read=copy)


def _entry(kind: str, start: int, stop: int, digest: str, t: torch.Tensor) -> dict[str, Any]:
    return {"kind": kind, "start": start, "stop": stop, "sha256": digest, "dtype": sh.dtype_name(t),
            "shape": list(t.shape)}


def _manifest(
    user_id: str | None, fingerprint: dict[str, Any], config: MemoryConfig, counters: dict[str, int] | None,
    pieces: list[dict[str, Any]], turns: int, version: str,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": version,
        "user_id": user_id,
        "fingerprint": fingerprint,
        "memory_config": json.loads(config.to_json()),
        "counters": counters,
        "pieces": pieces,
        "turns": turns,
    }


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportFormatError(f"{path} is not a memory export: it has no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise ExportFormatError(f"{path / MANIFEST} is unreadable: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportFormatError(f"{path} is not an mplus_agents memory export")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise ExportFormatError(
            f"{path} uses export format {manifest.get('format_version')} (mplus_agents "
            f"{manifest.get('library_version')}); upgrade mplus_agents to import it"
        )
    return manifest


def _read_ledger(path: Path) -> list[Turn]:
    turns = []
    try:
        lines = (path / LEDGER).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ExportFormatError(f"{path} has no readable {LEDGER}: {e}") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns.append(
                Turn(
                    id=None, text=str(row["text"]), role=row.get("role"), tokens=int(row["tokens"]),
                    created_at=datetime.fromisoformat(row["created_at"]), batch=int(row["batch"]),
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ExportFormatError(f"{path / LEDGER} line {n} is not a ledger row: {e}") from e
    return turns


def _read_state(path: Path, manifest: dict[str, Any], config: MemoryConfig) -> tuple[MemoryState, list[int]]:
    """Every piece, verified against its name, sha256, dtype and shape, assembled into a state."""
    by_kind: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
    for entry in manifest.get("pieces") or []:
        digest = str(entry["sha256"])
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ExportFormatError(f"{path}: bad shard name {digest!r}")
        file = path / SHARDS / (digest + sh.SUFFIX)
        try:
            data = file.read_bytes()
        except OSError as e:
            raise CorruptShardError(f"{path}: shard {file.name} is missing ({e})") from e
        if sh.sha256(data) != digest:
            raise CorruptShardError(f"{path}: shard {file.name} is corrupted (its sha256 does not match)")
        try:
            t = sh.decode(data)
        except sh.ShardFormatError as e:
            raise CorruptShardError(f"{path}: shard {file.name} is unreadable: {e}") from e
        if sh.dtype_name(t) != entry["dtype"] or list(t.shape) != list(entry["shape"]):
            raise CorruptShardError(f"{path}: shard {file.name} does not hold the {entry['kind']} the manifest lists")
        by_kind.setdefault(str(entry["kind"]), []).append((int(entry["start"]), int(entry["stop"]), t))
    tensors: dict[str, torch.Tensor] = {}
    for kind, parts in by_kind.items():
        parts.sort(key=lambda p: p[0])
        position = 0
        for a, b, _ in parts:
            if a != position:
                raise ExportFormatError(f"{path}: the pieces of {kind} do not tile it")
            position = b
        tensors[kind] = parts[0][2] if len(parts) == 1 else torch.cat([p[2] for p in parts], dim=1)
    pending = tensors.pop("pending", torch.zeros(0, dtype=torch.int64))
    counters = manifest.get("counters") or {}
    tensors["counters"] = torch.tensor(
        [int(counters.get(k, 0)) for k in ("injections", "tokens_injected", "next_block", "since_merge")],
        dtype=torch.int64,
    )
    try:
        state = MemoryState.from_tensors(config, tensors)
    except (KeyError, ValueError, TypeError) as e:
        raise ExportFormatError(f"{path} does not hold a complete memory: {e}") from e
    return state, [int(i) for i in pending.tolist()]


def import_export(store: MemoryStore, path: Path, user_id: str | None, *, replace: bool = False) -> str:
    """`MemoryStore.import_`: verify everything, then write shards and commit in one transaction."""
    path = path.expanduser()
    if not path.is_dir():
        raise InvalidInputError(f"{path} is not a directory (an export is a directory)")
    manifest = _read_manifest(path)
    target = validate_user_id(user_id if user_id is not None else manifest.get("user_id"))
    try:
        config = MemoryConfig(**{**manifest["memory_config"], "score_layers": _tuple(manifest["memory_config"])})
        fingerprint = dict(manifest["fingerprint"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportFormatError(f"{path / MANIFEST} has no valid memory config or fingerprint: {e}") from e
    turns = _read_ledger(path)
    state, pending = _read_state(path, manifest, config)
    with store._user_lock(target):
        if store._head(target) is not None:
            if not replace:
                raise UserExistsError(f"user {target!r} already has a memory; pass replace=True to overwrite it")
            with contextlib.suppress(UnknownUserError):
                store.delete_user(target)
        store._commit(fingerprint, target, None, state, pending, new_turns=turns, config=config)
    return target


def _tuple(config: dict[str, Any]) -> tuple[int, ...] | None:
    layers = config.get("score_layers")
    return None if layers is None else tuple(int(i) for i in layers)
