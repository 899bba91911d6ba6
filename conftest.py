"""Repository-wide pytest setup.

Tests run torch on one thread: most use tiny models whose ops are far smaller than a thread hand-off, and on
a machine shared with other processes a second spinning thread slows everything down many times over.

Without CUDA, triton (an optional extra) can only run kernels in its interpreter, and it decides that when a
kernel is defined, which can be as early as `import transformers` (torch._dynamo imports triton). So this file,
which pytest loads before anything else, turns the interpreter on for CPU-only runs; tests/test_kernels.py
then checks the Triton kernels against their references on CPU.
"""

from __future__ import annotations

import os

import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
