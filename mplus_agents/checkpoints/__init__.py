"""Real M+ checkpoints (issue 6): load mplus-8b / MemoryLLM-8B style directories, and write our own.

`MPlusLLM.from_pretrained(dir)` routes a directory whose config.json carries M+ keys here; plain Hugging
Face model directories keep the ordinary path. `layout` names every file and key, `loader` reads them,
`writer.save_checkpoint` writes them (what `mplus train` saves).
"""

from mplus_agents.checkpoints.layout import is_checkpoint
from mplus_agents.checkpoints.loader import CheckpointInfo, ShippedMemory, load_checkpoint
from mplus_agents.checkpoints.writer import save_checkpoint

__all__ = ["CheckpointInfo", "ShippedMemory", "is_checkpoint", "load_checkpoint", "save_checkpoint"]
