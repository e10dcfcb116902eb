#!/usr/bin/env bash
# The main job, from a fresh clone: set-up, the digits demo (SGD vs S-SGD), then the quick
# benchmark subset (python -m bench: fused vs eager/naive PyTorch S-SGD vs plain SGD).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python3}" -m ssgd_fused.demo "$@"
echo
"${PYTHON:-python3}" -m bench --reps 3
