#!/usr/bin/env bash
# The one script a GPU machine runs: rebuild, GPU tests, benchmark suite, results file.
#
#   benchmarks/gpu_check.sh            # on a GPU machine; results in $OUT (or benchmarks/results)
#   benchmarks/gpu_check.sh --dry-run  # anywhere: tiny sizes, results in a temporary folder
#
# Writes into the output folder: gpu_check.log (everything printed), <date>-<card>.json and
# .md (every figure, docs/benchmarks.md), the paper table's .json/.md/.png, benchmark.json
# (pytest-benchmark) and diagnostics.json (eager against CUDA-graph times, GPU only).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
PY="${PYTHON:-python3}"
if [ "$dry" = 1 ]; then
  out="$(mktemp -d)"
else
  out="${OUT:-benchmarks/results}"
fi
mkdir -p "$out"
log="$out/gpu_check.log"
: >"$log"
failed=()

step() {  # step NAME COMMAND...: runs, logs, remembers a failure, goes on
  local name="$1"
  shift
  echo "=== $name: $*" | tee -a "$log"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  [ "$rc" = 0 ] || failed+=("$name")
}

step env "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')
try:
    import triton; print('triton', triton.__version__)
except ImportError as e: print('triton missing', e)"
if [ "$dry" = 0 ]; then
  # A build made elsewhere does not fit this machine's torch and Python.
  step build "$PY" -m pip install -e . --no-build-isolation --no-deps -q
fi
# Order: what a short lease must not lose comes first (correctness, then the figures file).
if [ "$dry" = 1 ]; then
  step gpu-tests "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --co
  step results "$PY" -m benchmarks.results --out-dir "$out" --quick
  step paper-table "$PY" benchmarks/paper_table.py --quick --out-dir "$out"
  step benchmarks "$PY" -m pytest benchmarks/ --benchmark-disable -q -p no:cacheprovider
else
  step gpu-tests timeout 150 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider -rfE \
    --continue-on-collection-errors
  step results timeout 150 "$PY" -m benchmarks.results --out-dir "$out"
  step paper-table timeout 70 "$PY" benchmarks/paper_table.py --out-dir "$out"
  step benchmarks timeout 70 "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$out/benchmark.json" --benchmark-columns=median,iqr,rounds
  step diagnostics timeout 90 "$PY" benchmarks/gpu_diagnostics.py --out "$out/diagnostics.json"
fi

echo "output in $out"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED steps: ${failed[*]}" | tee -a "$log"
  exit 1
fi
echo "all steps passed" | tee -a "$log"
