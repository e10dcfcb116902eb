#!/usr/bin/env bash
# Installs everything the project needs, idempotently: torch (2.13.0 CPU, only when missing), the
# test/bench tools, triton (for the interpreter tests), then builds ssgd_fused with its C++ kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "== installing torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
# Never let pip resolve torch itself from here on: everything below is torch-free or pinned.
"$PY" -m pip install -q numpy scikit-learn pytest hypothesis pytest-benchmark tqdm matplotlib ruff
# evidence study: mnist1d generates its data offline; the flatness tests cross-check hessian-eigenthings (torch pinned)
"$PY" -m pip install -q mnist1d hessian-eigenthings==1.0.0a5 -c <("$PY" -c "import torch; print('torch==' + torch.__version__)")
# training frameworks for ssgd_fused.integrations and its tests (versions tested; torch pinned)
"$PY" -m pip install -q lightning==2.6.6 transformers==5.24.0 accelerate==1.15.0 -c <("$PY" -c "import torch; print('torch==' + torch.__version__)")
if [ "${SSGD_FUSED_NO_TRITON:-0}" = "0" ] && ! "$PY" -c "import triton" 2>/dev/null; then
  echo "== installing triton==3.9.0 (interpreter tests)"
  "$PY" -m pip install -q triton==3.9.0
fi
echo "== building ssgd_fused (C++ extension)"
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
