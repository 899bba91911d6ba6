"""LlamaIndex chat memory backed by mplus_agents' latent memory: `MPlusMemory` (use it with `MPlus`)."""

from llama_index.memory.mplus.base import MPlusMemory

__all__ = ["MPlusMemory"]
