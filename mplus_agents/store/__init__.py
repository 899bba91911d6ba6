"""Persistent per-user latent memory: `MemoryStore` (SQL metadata plus tensor shards, DESIGN 6).

Needs the `store` extra (`pip install "mplus-agents[store]"`; PostgreSQL also needs `[postgres]`). The
names are imported lazily so that `mplus_agents.store.errors` works without SQLAlchemy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mplus_agents.store.errors import (
    CorruptShardError,
    LockTimeoutError,
    NotStoredError,
    StoreError,
    StoreUnavailableError,
    UnknownTurnError,
    UnknownUserError,
    UserExistsError,
)

if TYPE_CHECKING:
    from mplus_agents.store.store import MemoryStore, SaveReport, UserInfo

__all__ = [
    "CorruptShardError",
    "LockTimeoutError",
    "MemoryStore",
    "NotStoredError",
    "SaveReport",
    "StoreError",
    "StoreUnavailableError",
    "UnknownTurnError",
    "UnknownUserError",
    "UserExistsError",
    "UserInfo",
]

_LAZY = {"MemoryStore", "SaveReport", "UserInfo"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            from mplus_agents.store import store
        except ImportError as e:  # pragma: no cover - depends on the installed extras
            raise ImportError(
                f"mplus_agents.store needs SQLAlchemy, Alembic and fsspec ({e}); install them with "
                '`pip install "mplus-agents[store]"`'
            ) from e
        return getattr(store, name)
    raise AttributeError(f"module 'mplus_agents.store' has no attribute {name!r}")
