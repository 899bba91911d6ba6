"""Errors of the persistent store (DESIGN 6), each saying what went wrong and how to get out of it.

This module imports nothing optional, so `LatentMemory` can raise `NotStoredError` even where SQLAlchemy is
not installed.
"""

from __future__ import annotations

from mplus_agents.errors import InvalidInputError, MPlusError


class StoreError(MPlusError):
    """Base class of every store error."""


class StoreUnavailableError(StoreError, OSError):
    """The database or the shard location cannot be opened or written (bad URL, server down, disk full)."""


class UnknownUserError(StoreError, LookupError):
    """No memory is stored for this user id."""

    def __init__(self, user_id: str) -> None:
        super().__init__(f"no memory is stored for user {user_id!r}")
        self.user_id = user_id

    def __str__(self) -> str:  # LookupError would quote the message again
        return str(self.args[0])


class UserExistsError(StoreError, ValueError):
    """An import would overwrite a user who already has a memory."""


class UnknownTurnError(StoreError, InvalidInputError):
    """`forget` was given turn ids that are not in the user's saved history."""


class CorruptShardError(StoreError, ValueError):
    """A tensor shard is missing, truncated, altered, or does not belong to this memory.

    The ledger still holds every turn, so `MemoryStore.open(llm, user_id, rebuild=True)` recovers the memory.
    """


class LockTimeoutError(StoreError, TimeoutError):
    """Another process held this user's lock for longer than the store's `lock_timeout`."""


class NotStoredError(StoreError, RuntimeError):
    """`save()` on a memory that lives only in this process."""
