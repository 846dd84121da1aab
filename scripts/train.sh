#!/usr/bin/env bash
# Set up .venv (if needed) and run the main job, `unipeft train`, with any options you pass. It runs in
# the current folder, so relative --data paths work and the run lands in ./runs/<timestamp>/. E.g.
#   bash scripts/train.sh                         # MiniLM + LoRA on the embedded tweet-sentiment corpus
#   bash scripts/train.sh --data my.csv --epochs 5
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
setup_venv data
exec unipeft train "$@"
