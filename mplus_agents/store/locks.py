"""Per-user write locks that work across processes and machines (DESIGN 6, issue 3 item 4).

Every change to a user's memory (save, forget, rebuild, import, delete) happens while holding that user's
lock, so load-modify-commit never interleaves with another writer of the same user. Locks are per user:
two users never wait for each other. Readers take no lock (they read the committed head snapshot).

- PostgreSQL: a session-level advisory lock on a dedicated connection. The server drops it when the
  connection dies, so a writer killed with SIGKILL never leaves a stale lock.
- SQLite: `flock` on a small file per user beside the database (named by a hash of the user id, never the
  id itself). The kernel drops it when the process dies, for the same reason.

Within one process the lock is reentrant per thread, and threads queue on a `threading.RLock` first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine, text

from mplus_agents.store.errors import LockTimeoutError, StoreUnavailableError

POLL_START = 0.005
POLL_MAX = 0.1


def lock_name(name: str) -> str:
    return hashlib.sha256(b"mplus-agents-lock\x00" + name.encode("utf-8")).hexdigest()


def advisory_key(name: str) -> int:
    """A signed 64-bit key for `pg_advisory_lock` (collisions would only make two users share a lock)."""
    return int.from_bytes(bytes.fromhex(lock_name(name))[:8], "big", signed=True)


class Backend(Protocol):
    def try_acquire(self, name: str) -> Any | None: ...

    def release(self, handle: Any) -> None: ...


class FileLocks:
    """`flock` on `<directory>/<sha256>.lock`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def try_acquire(self, name: str) -> int | None:
        import fcntl

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / f"{lock_name(name)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreUnavailableError(f"cannot create lock file in {self.directory}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        return fd

    def release(self, handle: int) -> None:
        import fcntl

        try:
            fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            os.close(handle)


class AdvisoryLocks:
    """`pg_try_advisory_lock` on a connection kept open while the lock is held."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def try_acquire(self, name: str) -> Any | None:
        key = advisory_key(name)
        conn = self.engine.connect()
        try:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            conn.commit()  # session-level lock: it outlives the transaction, the connection must not idle in one
        except BaseException:
            conn.close()
            raise
        if not got:
            conn.close()
            return None
        return conn, key

    def release(self, handle: Any) -> None:
        conn, key = handle
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
        finally:
            conn.close()


class LockManager:
    """Named cross-process locks with a timeout; reentrant within a thread."""

    def __init__(self, backend: Backend, timeout: float) -> None:
        self.backend = backend
        self.timeout = timeout
        self._guard = threading.Lock()
        self._local: dict[str, threading.RLock] = {}
        self._held: dict[str, tuple[Any, int]] = {}

    def _thread_lock(self, name: str) -> threading.RLock:
        with self._guard:
            lock = self._local.get(name)
            if lock is None:
                lock = self._local[name] = threading.RLock()
            return lock

    @contextlib.contextmanager
    def hold(self, name: str, what: str, timeout: float | None = None) -> Iterator[None]:
        """Hold lock `name`; `what` names it in the timeout error ("user 'alice'")."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        local = self._thread_lock(name)
        if not local.acquire(timeout=max(limit, 0.0)):
            raise LockTimeoutError(f"{what} is locked by another thread of this process for over {limit:g} s")
        try:
            handle, depth = self._held.get(name, (None, 0))
            if depth == 0:
                handle = self._acquire(name, what, deadline, limit)
            self._held[name] = (handle, depth + 1)
            try:
                yield
            finally:
                handle, depth = self._held[name]
                if depth == 1:
                    del self._held[name]
                    self.backend.release(handle)
                else:
                    self._held[name] = (handle, depth - 1)
        finally:
            local.release()

    def _acquire(self, name: str, what: str, deadline: float, limit: float) -> Any:
        wait = POLL_START
        while True:
            handle = self.backend.try_acquire(name)
            if handle is not None:
                return handle
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"{what} is locked by another process for over {limit:g} s; retry, or raise the store's "
                    "lock_timeout"
                )
            time.sleep(wait)
            wait = min(wait * 2, POLL_MAX)
