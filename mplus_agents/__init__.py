"""mplus_agents: latent long-term memory for LLM agents, M+ style (see README and shared/DESIGN.md)."""

from mplus_agents.config import MemoryConfig
from mplus_agents.errors import (
    InvalidInputError,
    MemoryMismatchError,
    MPlusError,
    UnsupportedModelError,
)
from mplus_agents.memory import LatentMemory, MemoryStats
from mplus_agents.model import MPlusLLM
from mplus_agents.state import MemoryState, TokenStore

__all__ = [
    "InvalidInputError",
    "LatentMemory",
    "MPlusError",
    "MPlusLLM",
    "MemoryConfig",
    "MemoryMismatchError",
    "MemoryState",
    "MemoryStats",
    "MemoryStore",
    "TokenStore",
    "UnsupportedModelError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`MemoryStore` needs the `store` extra (SQLAlchemy), so it is imported on first use only."""
    if name == "MemoryStore":
        from mplus_agents.store import MemoryStore

        return MemoryStore
    raise AttributeError(f"module 'mplus_agents' has no attribute {name!r}")
