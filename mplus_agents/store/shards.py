"""Tensor shards: how a memory state is cut into files, and where those files live (DESIGN 6).

A shard is one safetensors file holding one tensor, named by the sha256 of its bytes, so identical pieces
are stored once and an unchanged piece is never rewritten. Files are written beside their final name,
fsynced and renamed; a reader therefore sees a complete file or none, and checks the sha256 anyway.

Cutting: the per-token fields that never change (`k`, `v`, `hidden`, `score_key`, `word`; `[L, n, ...]`) are
cut along the token axis into pieces of roughly `target_bytes`, covering all layers. Cut points are chosen from the
content (where the retrieval-block id of layer 0 crosses a multiple of a block group), not from the index,
so when the oldest tokens leave the pool or the long-term store, the pieces after them keep their bytes and
their names. Small per-token fields (`age`, `block`, `rf`) change on every injection anyway (ages grow) and
are stored whole, one file per part.

Storage: a local directory (the default) or any fsspec URL (`s3://bucket/prefix`, `memory://x`). Paths are
`<memory key>/<sha[:2]>/<sha>.safetensors`, where the memory key is a random hex name: no user id ever
becomes part of a path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

from mplus_agents.fsutil import fsync_dir
from mplus_agents.state import MemoryState
from mplus_agents.store.errors import StoreUnavailableError

try:  # a fast non-cryptographic hash spots unchanged pieces without a sha256 pass over GBs
    import xxhash

    _xxh: Any = xxhash.xxh3_128
except ImportError:  # pragma: no cover - xxhash ships with most installs; without it every piece is sha256'd
    _xxh = None

TENSOR = "t"
PARTS = ("pool", "ltm", "staging")
TOKEN_FIELDS = ("k", "v", "hidden", "score_key", "word", "k_scale", "v_scale", "hidden_scale")
"""Fields cut along the token axis; the others of a part are stored whole."""
DEFAULT_TARGET_BYTES = 8 * 2**20
SUFFIX = ".safetensors"


@dataclass
class Piece:
    """A tensor of the state, or a token range of one, destined for one shard."""

    kind: str
    start: int
    stop: int
    tensor: torch.Tensor


def _cuts(block0: torch.Tensor, tokens_per_piece: int, block_size: int) -> list[int]:
    """Boundaries `0 = c0 < c1 < ... < cm = n` chosen from the block ids of layer 0.

    A cut is allowed where `block // group` changes; one is taken there if the current piece already
    has half a piece's worth of tokens, and forced if a piece would grow past twice the target.
    """
    n = int(block0.numel())
    if n == 0:
        return [0, 0]
    group = max(1, tokens_per_piece // max(1, block_size))
    g = torch.div(block0, group, rounding_mode="floor")
    candidates = (torch.nonzero(g[1:] != g[:-1]).flatten() + 1).tolist()
    cuts = [0]
    half, limit = max(1, tokens_per_piece // 2), max(2, 2 * tokens_per_piece)
    for c in [*candidates, n]:
        while c - cuts[-1] > limit:
            cuts.append(cuts[-1] + limit)
        if (c == n or c - cuts[-1] >= half) and c != cuts[-1]:
            cuts.append(c)
    return cuts


def plan(state: MemoryState, pending: list[int], target_bytes: int = DEFAULT_TARGET_BYTES) -> list[Piece]:
    """Every tensor of `state` (and the pending token ids) as pieces; see the module docstring."""
    pieces: list[Piece] = []
    block_size = state.config.block_size
    for part in PARTS:
        store = getattr(state, part)
        n = len(store)
        fields = store.tensors()
        row_bytes = max(1, fields["k"][:, :1].numel() * fields["k"].element_size())
        cuts = _cuts(fields["block"][0], max(1, target_bytes // row_bytes), block_size)
        for name, t in fields.items():
            kind = f"{part}.{name}"
            if name in TOKEN_FIELDS:
                for a, b in itertools.pairwise(cuts):
                    pieces.append(Piece(kind, a, b, t[:, a:b]))
            else:
                pieces.append(Piece(kind, 0, n, t))
    pieces.append(Piece("rng_state", 0, 0, state.rng_state))
    pieces.append(Piece("pending", 0, len(pending), torch.tensor(pending, dtype=torch.int64)))
    return pieces


DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODES = {v: k for k, v in DTYPES.items()}


def _view(t: torch.Tensor) -> memoryview:
    array: Any = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(array)


def _body(t: torch.Tensor) -> list[memoryview]:
    """The tensor's bytes in row-major order without copying where possible.

    A token range of a `[L, n, ...]` field is not contiguous, but each layer's slice is: those are written
    one after the other instead of gathering a copy of the whole piece first.
    """
    t = t.detach().to("cpu")
    if t.numel() == 0:
        return []
    if t.is_contiguous():
        return [_view(t)]
    if t.dim() >= 2 and all(t[i].is_contiguous() for i in range(t.shape[0])):
        return [_view(t[i]) for i in range(t.shape[0])]
    return [_view(t.contiguous())]


@dataclass
class Encoded:
    """A shard file as a list of buffers (header, then the tensor's bytes), never joined in memory."""

    parts: list[bytes | memoryview]

    @property
    def nbytes(self) -> int:
        return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in self.parts)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for p in self.parts:
            h.update(p)
        return h.hexdigest()

    def tobytes(self) -> bytes:
        return b"".join(bytes(p) for p in self.parts)


def encode(t: torch.Tensor) -> Encoded:
    """A one-tensor safetensors file (8-byte little-endian header size, JSON header padded with spaces to
    8 bytes, raw little-endian data): readable by `safetensors` itself, nothing executable."""
    if t.dtype not in DTYPES:
        raise TypeError(f"cannot store a {t.dtype} tensor")
    body = _body(t)
    size = sum(b.nbytes for b in body)
    header = json.dumps(
        {TENSOR: {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [0, size]}},
        separators=(",", ":"),
    ).encode()
    header += b" " * (-(8 + len(header)) % 8)
    return Encoded([len(header).to_bytes(8, "little") + header, *body])


def quick_hash(t: torch.Tensor) -> str | None:
    """xxh3-128 of dtype, shape and bytes (None without `xxhash`): cheap enough to run over every piece."""
    if _xxh is None:
        return None
    h = _xxh()
    h.update(f"{t.dtype}:{list(t.shape)}\n".encode())
    for b in _body(t):
        h.update(b)
    return str(h.hexdigest())


class ShardFormatError(ValueError):
    """Bytes that are not a one-tensor safetensors file of the kind `encode` writes."""


def decode(data: bytes | bytearray) -> torch.Tensor:
    """Parse a file written by `encode`. With a `bytearray` the tensor uses its memory (no copy)."""
    if len(data) < 8:
        raise ShardFormatError("file shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > 1 << 20:
        raise ShardFormatError("header size beyond the end of the file")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
        entry = header[TENSOR]
        dtype = CODES[entry["dtype"]]
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(x) for x in entry["data_offsets"])
    except (ValueError, KeyError, TypeError) as e:
        raise ShardFormatError(f"bad safetensors header: {e}") from e
    count = 1
    for d in shape:
        count *= d
    item = torch.empty(0, dtype=dtype).element_size()
    if begin != 0 or end != count * item or 8 + n + end != len(data) or min(shape, default=0) < 0:
        raise ShardFormatError("the header's shape and offsets do not match the file")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=8 + n).reshape(shape)


class ChecksumError(ValueError):
    """The bytes read do not hash to the name they were stored under."""


Destination = Callable[[torch.dtype, list[int]], torch.Tensor]
"""Given the header's dtype and shape, returns the (possibly non-contiguous) tensor to read the data into;
raises `ShardFormatError` if they are not what the caller expects."""


def _read_exactly(f: Any, view: memoryview) -> None:  # any binary file object with readinto
    done = 0
    while done < view.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise ShardFormatError("file ends before its data")
        done += n


def read_verified(f: BinaryIO, digest: str, destination: Destination) -> torch.Tensor:
    """Read a shard straight into the tensor `destination` gives, hashing as it goes; the bytes land in
    their final place with no intermediate buffer. Raises `ChecksumError` if the sha256 is not `digest`
    (the destination then holds garbage and must be dropped)."""
    h = hashlib.sha256()
    prefix = f.read(8)
    if len(prefix) != 8:
        raise ShardFormatError("file shorter than a safetensors header")
    n = int.from_bytes(prefix, "little")
    if n > 1 << 20:
        raise ShardFormatError("implausible safetensors header size")
    raw = f.read(n)
    if len(raw) != n:
        raise ShardFormatError("file ends inside its header")
    h.update(prefix)
    h.update(raw)
    try:
        entry = json.loads(raw)[TENSOR]
        dtype = CODES[entry["dtype"]]
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(x) for x in entry["data_offsets"])
    except (ValueError, KeyError, TypeError) as e:
        raise ShardFormatError(f"bad safetensors header: {e}") from e
    t = destination(dtype, shape)
    if t.dtype != dtype or list(t.shape) != shape or t.device.type != "cpu":
        raise ShardFormatError("destination does not match the header")
    if begin != 0 or end != t.numel() * t.element_size():
        raise ShardFormatError("the header's offsets do not match its shape")
    for view in _body(t):
        _read_exactly(f, view)
        h.update(view)
    if f.read(1):
        raise ShardFormatError("file is longer than its data")
    if h.hexdigest() != digest:
        raise ChecksumError(f"sha256 {h.hexdigest()[:12]}... is not {digest[:12]}...")
    return t


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def relpath(memory_key: str, digest: str) -> str:
    return f"{memory_key}/{digest[:2]}/{digest}{SUFFIX}"


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class ShardStorage(Protocol):
    """Where shard files live. Paths are relative, `/`-separated."""

    location: str

    def write(self, path: str, data: Encoded) -> None: ...

    def read(self, path: str) -> bytearray: ...

    def open_read(self, path: str) -> BinaryIO: ...

    def delete(self, path: str) -> None: ...

    def listdir(self, prefix: str) -> list[str]: ...

    def remove_tree(self, prefix: str) -> None: ...


def _write_error(location: str, e: OSError) -> StoreUnavailableError:
    reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else str(e)
    return StoreUnavailableError(
        f"cannot write a shard under {location}: {reason} ({e.strerror or e}). Nothing was committed; the "
        "previous snapshot is intact."
    )


class LocalShards:
    """Shards in a local directory: temp file, fsync, rename, fsync of the directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.location = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailableError(f"cannot create the shard directory {self.root}: {e}") from e

    def _abs(self, path: str) -> Path:
        p = (self.root / path).resolve()
        if self.root not in p.parents:
            raise ValueError(f"shard path {path!r} leaves the shard root")
        return p

    def write(self, path: str, data: Encoded) -> None:
        final = self._abs(path)
        created: list[Path] = []
        parent = final.parent
        while not parent.exists():
            created.append(parent)
            parent = parent.parent
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                for part in data.parts:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _write_error(self.location, e) from e
        fsync_dir(final.parent)
        for d in created:
            fsync_dir(d.parent)

    def open_read(self, path: str) -> BinaryIO:
        return open(self._abs(path), "rb")

    def read(self, path: str) -> bytearray:
        p = self._abs(path)
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buffer = bytearray(size)
            if f.readinto(buffer) != size:
                raise OSError(f"{p} changed size while being read")
        return buffer

    def delete(self, path: str) -> None:
        p = self._abs(path)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        with contextlib.suppress(OSError):  # the `<sha[:2]>` directory, once empty
            p.parent.rmdir()

    def listdir(self, prefix: str) -> list[str]:
        base = self._abs(prefix)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def remove_tree(self, prefix: str) -> None:
        base = self._abs(prefix)
        if not base.exists():
            return
        for p in sorted(base.rglob("*"), key=lambda q: len(q.parts), reverse=True):
            if p.is_dir():
                p.rmdir()
            else:
                p.unlink()
        base.rmdir()
        fsync_dir(base.parent)


class FsspecShards:
    """Shards under any fsspec URL. Objects are written under a temporary name and moved into place
    (object stores make each PUT atomic anyway); the sha256 check on load catches anything else."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except (ImportError, ValueError, OSError) as e:
            raise StoreUnavailableError(f"cannot open shard location {url!r}: {e}") from e
        self.fs = fs
        self.root = root.rstrip("/")
        self.location = url

    def _abs(self, path: str) -> str:
        if path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"shard path {path!r} leaves the shard root")
        return f"{self.root}/{path}"

    def write(self, path: str, data: Encoded) -> None:
        final = self._abs(path)
        tmp = f"{final}.{uuid.uuid4().hex}.tmp"
        try:
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(tmp, data.tobytes())
            self.fs.mv(tmp, final)
        except OSError as e:
            with contextlib.suppress(OSError):
                self.fs.rm_file(tmp)
            raise _write_error(self.location, e) from e

    def open_read(self, path: str) -> BinaryIO:
        return self.fs.open(self._abs(path), "rb")  # type: ignore[no-any-return]

    def read(self, path: str) -> bytearray:
        return bytearray(self.fs.cat_file(self._abs(path)))

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._abs(path))

    def listdir(self, prefix: str) -> list[str]:
        base = self._abs(prefix)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        strip = len(self.root) + 1
        return sorted(str(p)[strip:] if str(p).startswith(self.root) else str(p) for p in found)

    def remove_tree(self, prefix: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._abs(prefix), recursive=True)


def open_storage(spec: str | Path, **storage_options: Any) -> ShardStorage:
    """A local path or `file://` URL gives `LocalShards`; any other URL goes through fsspec."""
    s = str(spec)
    if isinstance(spec, Path) or "://" not in s:
        return LocalShards(s)
    if s.startswith("file://"):
        return LocalShards(s.removeprefix("file://"))
    return FsspecShards(s, **storage_options)
