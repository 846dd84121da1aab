#!/usr/bin/env bash
# The release-compatibility run: a fast subset (every method on representative families, the assumptions of
# unipeft/compat.py, the prefix attention oracle, transformers.Trainer, `unipeft train` under torchrun and
# accelerate launch) in an environment of its own, against
#   newest   the newest transformers, accelerate and peft releases that pyproject allows, resolved now
#   oldest   every runtime dependency at the lowest release pyproject allows (torch: the pinned CPU build)
# and everything else from the lock. Extra arguments go to pytest, e.g.
#   bash scripts/compat.sh newest
#   bash scripts/compat.sh oldest -x
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
which="${1:-}"
case "$which" in newest|oldest) shift ;; *) echo "usage: bash scripts/compat.sh newest|oldest [pytest args]" >&2; exit 2 ;; esac

# what moves: the three libraries, and the packages whose pins their releases move with them
MOVING='^(transformers|accelerate|peft|tokenizers|huggingface[-_]hub|safetensors)=='
venv="$ROOT/.venv-$which"
mkdir -p "$venv"
constraints="$venv/constraints.txt"
grep -viE "$MOVING" "$LOCK" > "$constraints"
lowest() {  # the lower bound pyproject declares for a runtime dependency
    sed -nE "s/^ *\"$1>=([0-9.]+).*/\1/p" "$ROOT/pyproject.toml" | head -1
}
if [ "$which" = oldest ]; then
    for package in transformers accelerate safetensors tqdm; do
        version="$(lowest "$package")"
        [ -n "$version" ] || { echo "pyproject declares no lower bound for $package" >&2; exit 2; }
        grep -viE "^$package==" "$constraints" > "$constraints.tmp" || true
        mv "$constraints.tmp" "$constraints"
        echo "$package==$version" >> "$constraints"
    done
fi
setup_venv test "$venv" "$constraints"
if [ "$which" = newest ]; then
    python -m pip install --quiet --upgrade --constraint "$constraints" -e "$ROOT[test]" transformers accelerate peft
fi
python - <<'PY'
from importlib.metadata import version
print("compat run with " + ", ".join(f"{p} {version(p)}" for p in
      ("torch", "transformers", "accelerate", "peft", "safetensors", "tokenizers", "huggingface_hub", "tqdm")))
PY
cd "$ROOT"
exec python -m pytest -n 2 -p no:cacheprovider tests/test_compat.py tests/test_release_compat.py \
    tests/test_seq2seq_prefix.py tests/test_hf_trainer.py \
    tests/test_distributed.py::test_unipeft_train_under_a_launcher_saves_a_run_that_one_process_reproduces "$@"
