#!/usr/bin/env bash
# The one script a GPU machine runs: rebuild, GPU tests, benchmark suite, results file.
#
#   benchmarks/gpu_check.sh            # on a GPU machine; results in $OUT (or benchmarks/results)
#   benchmarks/gpu_check.sh --dry-run  # anywhere: tiny sizes, results in a temporary folder
#   benchmarks/gpu_check.sh --anchors DIR  # the comparison packages' archives (default: anchors/)
#   benchmarks/gpu_check.sh --part core    # build, kernel GPU tests, the targets' figures (<8 min)
#   benchmarks/gpu_check.sh --part extra   # the other figures, build GPU tests, paper table,
#                                          # pytest-benchmark, diagnostics
#
# Before the figures, a real run installs torch-linear-assignment 0.1.0 from
# DIR/torch_linear_assignment-0.1.0.tar.gz into the environment and 0.0.6 (compiled with
# nvcc) into build/tla006, whose path it exports as STELLAR_TLA006_PATH so that the
# hungarian benchmarks load both in one process; a missing archive is skipped with a reason.
#
# Writes into the output folder: gpu_check.log (everything printed), <date>-<card>.json and
# .md (the core figures, docs/benchmarks.md), <date>-<card>-extra.json and .md (the others),
# the paper table's .json/.md/.png, benchmark.json (pytest-benchmark) and diagnostics.json
# (eager against CUDA-graph times, GPU only).
set -uo pipefail

usage() { echo "usage: $0 [--dry-run] [--anchors DIR] [--part core|extra]" >&2; }
dry=0
part=all
anchors=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --anchors)
      [ "$#" -ge 2 ] || { usage; exit 2; }
      anchors="$2"
      shift
      ;;
    --anchors=*) anchors="${1#--anchors=}" ;;
    --part)
      [ "$#" -ge 2 ] && { [ "$2" = core ] || [ "$2" = extra ]; } || { usage; exit 2; }
      part="$2"
      shift
      ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage; exit 2 ;;
  esac
  shift
done
# A relative DIR is taken from where the script was started.
if [ -n "$anchors" ] && [ "${anchors#/}" = "$anchors" ]; then
  anchors="$PWD/$anchors"
fi
cd "$(dirname "$0")/.."
if [ -z "$anchors" ] && [ -d anchors ]; then
  anchors="$PWD/anchors"
fi
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
gpu_tests_s=180  # the core GPU tests' limit, and the background build's beside them

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
if [ "$dry" = 0 ] && [ "$part" != extra ]; then
  # A build made elsewhere does not fit this machine's torch and Python.
  step build "$PY" -m pip install -e . --no-build-isolation --no-deps -q
fi

# The comparison packages (benchmarks/test_hungarian_match.py): torch-linear-assignment 0.1.0
# into the environment, 0.0.6 (same package name) into a folder of its own.
install_anchors() {
  local tla010="torch_linear_assignment-0.1.0.tar.gz"
  local tla006="torch_linear_assignment-0.0.6.tar.gz"
  local tla006_dir="$PWD/build/tla006"
  if [ -z "$anchors" ]; then
    echo "skipping torch-linear-assignment 0.1.0 and 0.0.6: no anchors folder (pass --anchors DIR or put the archives in anchors/)" | tee -a "$log"
  elif [ ! -d "$anchors" ]; then
    echo "skipping torch-linear-assignment 0.1.0 and 0.0.6: anchors folder $anchors does not exist" | tee -a "$log"
  else
    if [ ! -f "$anchors/$tla010" ]; then
      echo "skipping torch-linear-assignment 0.1.0: no archive in $anchors ($tla010)" | tee -a "$log"
    elif [ "$dry" = 1 ]; then
      echo "dry run: would install $anchors/$tla010 into the environment" | tee -a "$log"
    else
      step tla-0.1.0 timeout 30 "$PY" -m pip install --no-deps --no-build-isolation -q \
        "$anchors/$tla010"
    fi
    if [ ! -f "$anchors/$tla006" ]; then
      echo "skipping torch-linear-assignment 0.0.6: no archive in $anchors ($tla006)" | tee -a "$log"
    elif [ "$dry" = 1 ]; then
      echo "dry run: would build $anchors/$tla006 into $tla006_dir" | tee -a "$log"
    else
      # For this build only: the CUDA toolkit the project's own build uses (the folder of
      # `nvcc` on the PATH may not be one) and, where that toolkit lacks the headers of the
      # CUDA libraries that torch's headers include (cusparse.h), torch's nvidia packages'.
      # FORCE_CUDA: 0.0.6 builds only its CPU stub where it sees no GPU.
      local build_env=(FORCE_CUDA=1) home="${CUDA_HOME:-}" inc arch
      if [ -z "$home" ]; then
        home="$("$PY" -c "from stellar_kernels._build import find_cuda_home; print(find_cuda_home()[0] or '')" 2>/dev/null)"
        [ -n "$home" ] && build_env+=("CUDA_HOME=$home")
      fi
      if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # torch's own guess fails where no GPU is seen
        arch="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability() if torch.cuda.is_available() else '')" 2>/dev/null)"
        [ -n "$arch" ] && build_env+=("TORCH_CUDA_ARCH_LIST=$arch")
      fi
      if [ -n "$home" ] && [ ! -f "$home/include/cusparse.h" ]; then
        inc="$("$PY" -c "import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, '*', 'include', 'cusparse.h'))})))" 2>/dev/null)"
        [ -n "$inc" ] && build_env+=("CPATH=$inc${CPATH:+:$CPATH}")
      fi
      rm -rf "$tla006_dir"
      unset STELLAR_TLA006_PATH
      # In the background (a minute of nvcc), beside the GPU tests; finish_anchors waits. Its
      # limit is the GPU tests' own, so that the wait never adds to the core part's time.
      echo "=== tla-0.0.6: building in the background into $tla006_dir" | tee -a "$log"
      (
        env "${build_env[@]}" timeout "$gpu_tests_s" "$PY" -m pip install --no-deps --no-build-isolation \
          -q --target "$tla006_dir" "$anchors/$tla006" >"$out/tla006-build.log" 2>&1
        echo $? >"$out/tla006-build.rc"
      ) &
      tla006_pid=$!
    fi
  fi
}

finish_anchors() {  # waits for the background build of 0.0.6 and exports where it went
  [ -n "${tla006_pid:-}" ] || return 0
  local t0=$SECONDS
  wait "$tla006_pid"
  local rc
  rc="$(cat "$out/tla006-build.rc" 2>/dev/null || echo 1)"
  tail -n 30 "$out/tla006-build.log" | tee -a "$log"
  echo "=== tla-0.0.6: exit $rc (waited $((SECONDS - t0)) s)" | tee -a "$log"
  [ "$rc" = 0 ] || failed+=("tla-0.0.6")
  if [ -f "$PWD/build/tla006/torch_linear_assignment/__init__.py" ]; then
    export STELLAR_TLA006_PATH="$PWD/build/tla006"
    echo "STELLAR_TLA006_PATH=$STELLAR_TLA006_PATH" | tee -a "$log"
  fi
}

# Order: what a short lease must not lose comes first. --part core: the build, the GPU tests
# of the kernels (torch-linear-assignment 0.0.6 compiling beside them) and the figures the
# targets need, the newest first (benchmarks/results.py: GROUPS); --part extra: the other
# figures (a file of their own), the GPU tests of the first-use build (minutes of nvcc), the
# paper table, pytest-benchmark and the diagnostics. Without --part, both in that order.
#
# The core part's limits sum to under 8 minutes: env ~7 s and build ~40 s (the last run's
# log), tla-0.1.0 30 s, gpu-tests 180 s (the 0.0.6 build shares that limit), results 210 s.
# Expected ~6 minutes: GPU tests ~140 s (57 took 96 s on the H200, now 73 and more
# candidates to compile), core figures ~150 s (42 s for all figures at c81c2a9, plus the
# torch.compile of the Sinkhorn-Knopp reference and of the training step).
core_tests=(tests -m gpu --ignore=tests/test_build.py)
build_tests=(tests/test_build.py -m gpu)
if [ "$dry" = 1 ]; then
  install_anchors
  step results "$PY" -m benchmarks.results --out-dir "$out" --quick --part core
  step results-extra "$PY" -m benchmarks.results --out-dir "$out" --quick --part extra
  step gpu-tests "$PY" -m pytest "${core_tests[@]}" -q -p no:cacheprovider --co
  step gpu-build-tests "$PY" -m pytest "${build_tests[@]}" -q -p no:cacheprovider --co
  step paper-table "$PY" benchmarks/paper_table.py --quick --out-dir "$out"
  step benchmarks "$PY" -m pytest benchmarks/ --benchmark-disable -q -p no:cacheprovider
else
  if [ "$part" != extra ]; then
    install_anchors
    # Every gpu-marked test of the kernels, among them the checks that need a GPU for the
    # launch path and the tuner: tests/test_launch.py (every kernel of the package, bound
    # launches bitwise equal to JITFunction.run's) and tests/test_tuning.py (tuning keeps the
    # allocator's cache and leaves other streams running).
    step gpu-tests timeout "$gpu_tests_s" "$PY" -m pytest "${core_tests[@]}" -q \
      -p no:cacheprovider -rfE --continue-on-collection-errors
    finish_anchors
    step results timeout 210 "$PY" -m benchmarks.results --out-dir "$out" --part core
  fi
  if [ "$part" != core ]; then
    step results-extra timeout 120 "$PY" -m benchmarks.results --out-dir "$out" --part extra
    step gpu-build-tests timeout 300 "$PY" -m pytest "${build_tests[@]}" -q \
      -p no:cacheprovider -rfE
    step paper-table timeout 70 "$PY" benchmarks/paper_table.py --out-dir "$out"
    step benchmarks timeout 70 "$PY" -m pytest benchmarks/ --benchmark-only -q \
      -p no:cacheprovider --benchmark-json="$out/benchmark.json" \
      --benchmark-columns=median,iqr,rounds
    step diagnostics timeout 90 "$PY" benchmarks/gpu_diagnostics.py --out "$out/diagnostics.json"
  fi
fi

echo "output in $out"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED steps: ${failed[*]}" | tee -a "$log"
  exit 1
fi
echo "all steps passed" | tee -a "$log"
