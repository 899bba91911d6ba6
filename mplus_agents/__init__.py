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
    "TokenStore",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
