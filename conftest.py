"""Repository-wide pytest setup.

Tests run torch on one thread: most use tiny models whose ops are far smaller than a thread hand-off, and on
a machine shared with other processes a second spinning thread slows everything down many times over.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)
