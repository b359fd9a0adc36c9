#!/usr/bin/env bash
# The whole benchmark suite on the GPU machine (one H200), at most about 6 minutes once the CUDA
# extension is built (building it, when the checkout has no CUDA build yet, adds about 3 minutes):
#
#     bash benchmarks/gpu_suite.sh [PART ...] [midus bench options]
#
# Runs `python -m midus.bench --device cuda --time-budget 320 --plot` from this checkout with the
# CUDA kernels on (MIDUS_OPS_CUDA_KERNELS=1): every subject at the shapes of docs/design.md §4, torch.compile
# baselines included; cases that would start after 320 s are recorded as skipped, and the whole
# command is killed at GPU_SUITE_TIMEOUT_S (380) with what was measured already saved. Results
# (bench_<gpu>_<date>.json), tables (.md) and plots (.png) go to $OUT, else benchmarks/results/.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${OUT:-$ROOT/benchmarks/results}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MIDUS_OPS_CUDA_KERNELS=${MIDUS_OPS_CUDA_KERNELS:-1}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
has_cuda_kernels() {
  PYTHONPATH=$ROOT "$PY" -c 'import torch, midus_ops, sys
sys.exit(0 if midus_ops.has_kernel("hive_gather", torch.device("cuda")) else 1)' 2>/dev/null
}
if ! has_cuda_kernels; then
  echo "== building the CUDA extension (pip install --no-build-isolation --no-deps .)"
  timeout 300 "$PY" -m pip install --no-build-isolation --no-deps --no-input . || exit 1
  so=$(cd /tmp && PYTHONPATH= "$PY" -c 'import midus_ops._C as c; print(c.__file__)') || exit 1
  [[ $so -ef $ROOT/midus_ops/$(basename "$so") ]] || cp -f "$so" "$ROOT/midus_ops/" || exit 1
  has_cuda_kernels || echo "WARNING: no CUDA kernels registered: the midus_ops rows will measure the reference"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
timeout --kill-after=10 "${GPU_SUITE_TIMEOUT_S:-380}" "$PY" -m midus.bench --device cuda \
  --time-budget "${GPU_SUITE_BUDGET_S:-320}" --out "$OUT_DIR" --plot "$@"
