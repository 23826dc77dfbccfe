#!/usr/bin/env bash
# Install lme-sim on a GPU node, from the repository root (used by cluster/Dockerfile and by the
# cluster launcher's setup_commands). vLLM first: it pins its own CUDA torch, transformers and numpy;
# then lme-sim without its CPU torch pin; then the project's other pinned dependencies.
set -euo pipefail
pip install --no-cache-dir vllm==0.32.0
pip install --no-cache-dir --no-deps -e .
pip install --no-cache-dir $(python - <<'PY'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(" ".join(d for d in deps if d.split("==")[0] not in ("torch", "transformers", "tokenizers", "safetensors", "numpy")))
PY
)
