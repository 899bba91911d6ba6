"""LlamaIndex LLM and query engine over mplus_agents' latent memory.

- `MPlus`: a function-calling LLM (`MPlus()` = the embedded SmolLM2-135M-Instruct) that reads a user's latent
  memory on every call.
- `MPlusQueryEngine`: documents injected once into a latent memory, then queried (no text retrieval).

The chat memory lives next door, in `llama_index.memory.mplus.MPlusMemory`.
"""

from llama_index.llms.mplus._loader import default_mplus_llm
from llama_index.llms.mplus.base import SESSION_KEY, MPlus
from llama_index.llms.mplus.query_engine import MPlusQueryEngine

__all__ = ["SESSION_KEY", "MPlus", "MPlusQueryEngine", "default_mplus_llm"]
