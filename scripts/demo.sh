#!/usr/bin/env bash
# The main job, from a fresh clone: set-up, then the digits demo (SGD vs S-SGD).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python3}" -m ssgd_fused.demo "$@"
