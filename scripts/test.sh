#!/usr/bin/env bash
# The test suite, from a fresh clone: set-up, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# a build failure must fail the tests, not silently fall back to the reference path
if compgen -G "csrc/*.cpp" >/dev/null; then export SSGD_FUSED_REQUIRE_CPP=${SSGD_FUSED_REQUIRE_CPP:-1}; fi
# OpenMP threads sleep when idle instead of spinning: on a busy machine a spinning waiter can
# share a core with the thread it waits for and stall every parallel region (docs/PERFORMANCE.md)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
"${PYTHON:-python3}" -m ruff check .
exec "${PYTHON:-python3}" -m pytest tests "$@"
