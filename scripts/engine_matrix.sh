#!/usr/bin/env bash
# Run the engine × method matrix (tests/test_distributed.py: every method trained under each engine on 2
# processes and compared with one process), record each column's cells with the date and device in
# benchmarks/results/engine_matrix/<column>.json, and render the README's table from those files.
#   bash scripts/engine_matrix.sh              # on this machine's CPU: DDP, bf16, FSDP, ZeRO-1/2/3
#   bash scripts/engine_matrix.sh -k zero3     # one column (extra arguments go to pytest)
# On a machine with a CUDA GPU it runs the GPU columns (fp16; with 2+ GPUs the others too, on the GPUs).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
setup_venv test
cd "$ROOT"
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    export UNIPEFT_ENGINE_DEVICE=cuda
fi
status=0
UNIPEFT_RECORD_ENGINE_MATRIX=1 python -m pytest -n 2 tests/test_distributed.py -k every_method "$@" || status=$?
python tests/test_readme_tables.py --write
exit "$status"
