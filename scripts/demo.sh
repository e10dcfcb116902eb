#!/usr/bin/env bash
# The main job, from a fresh clone: set-up, the demo (SGD vs S-SGD on mnist1d in the setting where
# the replication study finds a gain beyond the seeds' spread: accuracy AND flatness), then the
# quick benchmark subset (python -m bench: fused vs eager/naive PyTorch S-SGD vs plain SGD).
# The full evidence study is `python -m bench.paper` (docs/EVIDENCE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python3}" -m ssgd_fused.demo "$@"
echo
"${PYTHON:-python3}" -m bench --reps 3
