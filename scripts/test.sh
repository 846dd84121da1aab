#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite on two workers from the repository root; extra
# arguments go to pytest, e.g.
#   bash scripts/test.sh                     # everything, the slow real-model tests included
#   bash scripts/test.sh tests/test_cli.py
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
setup_venv test
cd "$ROOT"
exec python -m pytest -n 2 "$@"
