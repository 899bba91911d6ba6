"""Compile every Triton kernel for real NVIDIA targets on a machine without a GPU (run by tests/test_kernels.py).

The interpreter checks the kernels' numbers but accepts code the compiler rejects (types changing across loop
iterations, dot shapes, too much shared memory). triton's wheel ships ptxas, so the kernels can be compiled to
cubin for sm_86 (Ampere, 99 KB of shared memory per block) and sm_90 (Hopper) here, with the tile parameters
the wrappers would launch. Run with TRITON_INTERPRET unset: `python -m tests.kernels_compile`. Exit 0: all
compiled within the limits; 77: this triton has no NVIDIA backend (the test then skips); else a failure.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

TARGETS = [(86, 101376), (90, 232448)]
"""(compute capability, shared memory per block in bytes that the kernel may use)."""
HEAD_DIM = 128
"""The widest head_dim of common models: the largest tiles, the most shared memory."""
FLOAT_ARGS = {"scale", "inv_count"}
FP32_POINTERS = {"out_ptr", "shift_ptr", "inv_std_ptr", "mean_ptr", "m2_ptr"}


def signature(fn: Any, dtype: str) -> dict[str, str]:
    """Argument types for ASTSource: tensor pointers of the input dtype, fp32 outputs, i32 sizes and strides."""
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FP32_POINTERS else f"*{dtype}"
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def main() -> int:
    if os.environ.get("TRITON_INTERPRET"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
        return 2
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        print("this triton has no NVIDIA backend")
        return 77
    from mplus_agents.kernels import attention, scoring

    failures = 0
    for arch, shared_limit in TARGETS:
        for dtype, tname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            meta = scoring.launch_meta(rows=96, dim=HEAD_DIM, dtype=dtype)
            cases: list[tuple[str, Any, dict[str, object]]] = [
                (f"score max_mode={m} standardize={z}", scoring._score_kernel,
                 {**meta, "MAX_MODE": m, "STANDARDIZE": z})
                for m, z in ((False, False), (True, False), (True, True))
            ]  # fmt: skip
            cases.append(("moments", scoring._moments_kernel, meta))
            attention_meta = attention.launch_meta(HEAD_DIM, dtype)
            cases.append(("prefix_causal_attention", attention._prefix_causal_kernel, attention_meta))
            for label, fn, constexprs in cases:
                src = ASTSource(fn=fn, signature=signature(fn, tname), constexprs=constexprs)
                try:
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
                except Exception as exc:  # report every failing case, not just the first
                    print(f"FAIL sm_{arch} {tname} {label}: {type(exc).__name__}: {exc}")
                    failures += 1
                    continue
                shared = int(compiled.metadata.shared)
                ok = shared <= shared_limit
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} sm_{arch} {tname} {label}: {shared} B shared (limit {shared_limit})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
