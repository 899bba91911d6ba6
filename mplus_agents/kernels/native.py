"""Build and load the CPU kernels (`cpu_decode.c`, `ltm_scan.c`) with the system C compiler, once per machine.

Why compile at first use instead of shipping a wheel: the kernel is bandwidth-bound and wants the widest
vectors the CPU has (`-march=native`), and a pure-Python package keeps the install a plain `pip install`.
The shared library is cached under `cache_root()/native`, named by a hash of the source, the compiler, the
flags and the CPU's feature flags, so an upgrade or another machine sharing the cache gets its own build.
Without a compiler, or with `MPLUS_NATIVE=0`, `load()` returns None and the fast path stays on torch (one
warning when a compiler was expected but failed).

The library is loaded after torch, so its OpenMP calls bind to the libgomp torch already loaded (same
soname): one thread pool, sized by `torch.set_num_threads`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from mplus_agents.default_model import cache_root

SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_decode.c", "ltm_scan.c"))
"""Compiled together into one library (one build, one cache entry, one load)."""
FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-march=native")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    """False when the user switched the native kernels off (MPLUS_NATIVE=0)."""
    return os.environ.get("MPLUS_NATIVE", "1") != "0"


def compiler() -> str | None:
    """$CC, else the first of cc / gcc / clang on PATH."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_flags() -> str:
    """The CPU feature list -march=native compiles for (x86 `flags`, Arm `Features`), else the machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + platform.processor()


def library_path(cc: str) -> Path:
    """Where the build for this source, compiler, flags and CPU lives."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256()
    parts = [src.read_bytes() for src in SOURCES] + [version.encode(), " ".join(FLAGS).encode(), _cpu_flags().encode()]
    for part in parts:
        key.update(part)
        key.update(b"\0")
    return cache_root() / "native" / f"cpu_decode-{key.hexdigest()[:16]}.so"


def build(cc: str, target: Path) -> None:
    """Compile SOURCES to `target` through a temporary file and a rename, so concurrent builders never see half a
    library. Raises RuntimeError with the compiler's message on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, f = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    for gemv in (lib.mp_gemv, lib.mp_gemv_bf16):
        gemv.argtypes = [p, p, p, p, i, i]
        gemv.restype = None
    lib.mp_rms.argtypes = [p, p, p, i, f]
    lib.mp_rms.restype = None
    lib.mp_attend.argtypes = [p, p, p, p, p, i, i, i, i, i, f]
    lib.mp_attend.restype = None
    lib.mp_exp_floats.argtypes = [p, p, i]
    lib.mp_exp_floats.restype = None
    lib.mp_attend_floats.argtypes = [i, i, i]
    lib.mp_attend_floats.restype = i
    lib.mp_scratch_floats.argtypes = [p, i]
    lib.mp_scratch_floats.restype = i
    lib.mp_step.argtypes = [p, p, p, i, i, i, p, p, p, p]
    lib.mp_step.restype = None
    lib.mp_scan_vnni.argtypes = []
    lib.mp_scan_vnni.restype = ctypes.c_int
    lib.mp_scan_bounds.argtypes = [p, p, i, i, i, p, p, i, p, p, p, p, ctypes.c_int]
    lib.mp_scan_bounds.restype = None
    lib.mp_scan_list.argtypes = [p, p, i, f, p, i, p]
    lib.mp_scan_list.restype = i
    lib.mp_scan_pack.argtypes = [p, p, i, i, i, i, f, p, p, i]
    lib.mp_scan_pack.restype = None
    lib.mp_scan_rescore.argtypes = [p, i, i, p, i, p, p, p]
    lib.mp_scan_rescore.restype = None
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; None when disabled or it cannot be built."""
    global _lib, _tried
    if not enabled():
        return None
    with _lock:
        if _tried:
            return _lib
        _tried = True
        cc = compiler()
        if cc is None:
            return None  # no compiler: the torch path is the documented fallback, nothing to warn about
        try:
            import torch  # noqa: F401  (load torch's libgomp first, so the kernel shares its thread pool)

            path = library_path(cc)
            if not path.is_file():
                build(cc, path)
            _lib = _declare(ctypes.CDLL(str(path)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            warnings.warn(
                f"mplus_agents: could not build the CPU kernels, decoding and retrieval stay on torch: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
            _lib = None
        return _lib
