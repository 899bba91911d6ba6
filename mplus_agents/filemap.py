"""Long-term memory that does not have to fit in RAM (issue 7 item 2): file-backed tensors.

Two pieces, both plain `torch.UntypedStorage.from_file` mappings, so every consumer sees ordinary tensors:

- `map_safetensors` maps a safetensors file copy-on-write and returns each tensor as a view into the mapping:
  nothing is read until a page is touched (scoring a layer pages in that layer's keys only, because stores
  are laid out `[L, n, ...]`), and the kernel may drop clean pages again under memory pressure. A write to
  such a tensor would go to a private anonymous copy of the page, never to the file.
- `Spill` hands out growable buffers in unlinked files of a directory, mapped shared, so a long-term store
  that keeps growing after a mapped load (`TokenStore.append` through `Growth.allocate`) stays in file-backed
  pages the kernel can write back and evict, not in anonymous memory. The files are unlinked as soon as they
  are mapped, so a crash leaves nothing behind.

`file_backing` says which file (if any) holds a tensor's bytes; tests and `MemoryState` checks use it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mplus_agents.errors import MPlusError

CODES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in CODES.items()}
MAX_HEADER = 100 * 2**20
READ_CHUNK = 2**20


class MappedFileError(MPlusError, ValueError):
    """A safetensors file whose header does not describe its bytes (truncated, corrupted, not safetensors)."""


def _bytes(storage: Any) -> torch.Tensor:
    """A uint8 tensor over a whole storage (typed loosely: `from_file`'s stub returns a storage base class)."""
    return torch.empty(0, dtype=torch.uint8).set_(storage)


class SpillError(MPlusError, OSError):
    """No file-backed buffer could be made for a growing memory-mapped store (directory not writable, disk full)."""


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes sit in a safetensors file (absolute byte offsets)."""

    dtype: torch.dtype
    shape: list[int]
    begin: int
    end: int


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, Entry]]:
    """(metadata, entries) of a safetensors file, every entry checked against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise MappedFileError(f"{path} is shorter than a safetensors header")
        n = int.from_bytes(prefix, "little")
        if n > min(MAX_HEADER, size - 8):
            raise MappedFileError(f"{path}: header size {n} runs past the end of the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        entries: dict[str, Entry] = {}
        start = 8 + n
        for name, item in header.items():
            dtype = CODES[item["dtype"]]
            shape = [int(d) for d in item["shape"]]
            begin, end = (start + int(x) for x in item["data_offsets"])
            entries[name] = Entry(dtype, shape, begin, end)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise MappedFileError(f"{path}: bad safetensors header ({err})") from err
    for name, e in entries.items():
        item = torch.empty(0, dtype=e.dtype).element_size()
        if min(e.shape, default=0) < 0 or e.end - e.begin != math.prod(e.shape) * item or e.end > size:
            raise MappedFileError(f"{path}: tensor {name!r} does not fit the file (truncated or corrupted?)")
    return metadata, entries


def map_safetensors(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) with every tensor a zero-copy, copy-on-write view of the file's pages."""
    path = Path(path)
    metadata, entries = read_header(path)
    size = path.stat().st_size
    base = _bytes(torch.UntypedStorage.from_file(str(path), False, size))
    out: dict[str, torch.Tensor] = {}
    for name, e in entries.items():
        if e.end == e.begin:
            out[name] = torch.empty(e.shape, dtype=e.dtype)
            continue
        item = torch.empty(0, dtype=e.dtype).element_size()
        if e.begin % item:
            raise MappedFileError(f"{path}: tensor {name!r} is not aligned to its dtype and cannot be mapped")
        out[name] = base[e.begin : e.end].view(e.dtype).view(e.shape)
    return metadata, out


def iter_bytes(path: str | Path, entry: Entry, chunk: int = READ_CHUNK) -> Iterator[memoryview]:
    """The bytes of one tensor, read with plain `read` calls into a small buffer: hashing a mapped file this
    way keeps its pages out of the process's resident set (they go through the page cache only)."""
    buffer = bytearray(min(chunk, max(1, entry.end - entry.begin)))
    view = memoryview(buffer)
    with open(path, "rb") as f:
        f.seek(entry.begin)
        left = entry.end - entry.begin
        while left:
            got = f.readinto(view[: min(left, len(buffer))])
            if not got:
                raise MappedFileError(f"{path} ends inside a tensor (truncated?)")
            left -= got
            yield view[:got]


def tensor_chunks(t: torch.Tensor) -> Iterator[memoryview]:
    """A CPU tensor's bytes in row-major order, one layer at a time when it is a view into a wider buffer
    (a long-term store's `[L, n, ...]` view of `[L, capacity, ...]` growth buffers), so nothing is copied."""
    t = t.detach()
    if t.numel() == 0:
        return
    parts = [t] if t.is_contiguous() else list(t.unbind(0)) if t.dim() >= 2 else [t.contiguous()]
    for p in parts:
        p = p if p.is_contiguous() else p.contiguous()
        array: Any = p.reshape(-1).view(torch.uint8).numpy()
        yield memoryview(array)


def write_safetensors(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a standard safetensors file (readable by `safetensors` itself) straight from the tensors' memory.

    Unlike `safetensors.torch.save_file` it needs no contiguous copy of each tensor, which for a mapped or
    spilled long-term store would pull the whole store into RAM. Tensors are laid out by falling element
    size, so every offset is aligned for its dtype and the file can be mapped back (`map_safetensors`).
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in NAMES or t.device.type != "cpu":
            raise TypeError(f"cannot write tensor {name!r} ({t.dtype} on {t.device})")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for name in order:
        for chunk in tensor_chunks(tensors[name]):
            f.write(chunk)


@dataclass(frozen=True)
class Spill:
    """Allocates tensors in unlinked, shared-mapped files under `directory` (see the module docstring).

    The directory should be on a disk, not a tmpfs (`/dev/shm`, often `/tmp`), or the pages are RAM anyway.
    """

    directory: Path

    def empty(self, shape: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".mplus-ltm-", suffix=".spill", dir=self.directory)
            try:
                os.ftruncate(fd, nbytes)
                storage = torch.UntypedStorage.from_file(name, True, nbytes)
            finally:
                os.close(fd)
                os.unlink(name)
        except (OSError, RuntimeError) as e:
            raise SpillError(
                f"cannot create a {nbytes}-byte spill file for the long-term store in {self.directory}: {e}. "
                "Load the memory with spill_dir= set to a writable directory on a disk with free space."
            ) from e
        return _bytes(storage).view(dtype).view(list(shape))


def file_backing(t: torch.Tensor) -> str | None:
    """The file whose mapping holds `t`'s first byte (Linux `/proc/self/maps`), or None for anonymous memory.

    Unlinked spill files show as `<path> (deleted)`.
    """
    if t.numel() == 0 or t.device.type != "cpu":
        return None
    ptr = t.data_ptr()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= ptr < hi:
                    path = parts[5].strip() if len(parts) > 5 else ""
                    return path if path.startswith("/") else None
    except OSError:
        return None
    return None
