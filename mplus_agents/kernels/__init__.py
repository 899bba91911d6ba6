"""Triton kernels for the hot paths of memory retrieval and reading, each beside a PyTorch reference (DESIGN 7).

Layout (the Liger-Kernel/fla habit): `reference.py` holds the plain-torch definitions, `scoring.py` and
`attention.py` the kernels, `dispatch.py` the choice between them. Importing this package does not import
triton; the kernel modules do, and only the dispatcher (on CUDA) or a caller that asks for them loads them.

- Fused long-term scoring (SPEC 4.5): `dispatch.token_scores` / `dispatch.projector_scores`, used by
  retrieval.py on CUDA tensors; `scoring.score_top_k` adds the top-k.
- Prompt-over-memory-prefix attention: `dispatch.prefix_causal_attention`, and `register_hf_attention()` to
  use the kernel as a transformers attention implementation on CUDA.

Install with `pip install 'mplus-agents[triton]'`. On CPU the torch paths are the fast ones; the kernels run
there only under TRITON_INTERPRET=1, which the tests use to check them against the references.

The CPU has compiled kernels of its own (C, built by `native.py` with the system compiler on first use):
`cpu_decode.c`, a whole fp32 decode step (driven by `cpu_decode.py`; reference: FastDecoder's torch step), and
`ltm_scan.c`, score bounds for every long-term token from an int8 copy of the keys plus the exact rescoring of
the few it cannot rule out (driven by `ltm_scan.py` and `index/scan.py`; reference: `retrieval.py`).
"""

from __future__ import annotations

from mplus_agents.kernels.dispatch import (
    ATTENTION_NAME,
    choose_backend,
    prefix_causal_attention,
    projector_scores,
    token_scores,
    triton_installed,
)


def register_hf_attention() -> str:
    """Register the prefix-causal attention kernel with transformers under ATTENTION_NAME and return the name.

    Needs triton (the `triton` extra) and, to run, CUDA tensors; a model on CPU should keep `sdpa`.
    """
    if not triton_installed():
        raise ImportError("the attention kernel needs triton: pip install 'mplus-agents[triton]'")
    from mplus_agents.kernels import attention

    return attention.register_hf_attention()


__all__ = [
    "ATTENTION_NAME",
    "choose_backend",
    "prefix_causal_attention",
    "projector_scores",
    "register_hf_attention",
    "token_scores",
    "triton_installed",
]
