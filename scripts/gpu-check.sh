#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and no internet, build pregated with the CUDA
# backend required, run the GPU-marked tests, time a miss read in place against a copy
# (benchmarks/tools/read_in_place.py, seconds), run the standard benchmark suite, and keep what
# they measured.
#
#   scripts/gpu-check.sh [--results DIR] [--skip-tests] [--skip-bench] [--quick | --only 0,2] [--sanitize]
#   scripts/gpu-check.sh --dry-run --results DIR     the suite's steps on the CPU, tiny shapes
#
# The whole suite allows itself 16 minutes, more than one device call (10) and than a lease of 15
# minutes. In a short lease: `--skip-bench` first (build and tests), then `--skip-tests --quick`
# (the headline ratios: pregated.suite's QUICK_SUITE, at most 9 minutes) while the machine is
# warm; the build folder (build/gpu) is kept between calls, so the second build only relinks. With
# more time, `--skip-tests --only 0,1` and `--only 2,3` split the whole suite over two calls.
#
# --sanitize also runs the runtime's GPU tests (test_runtime_gpu.py, test_resident.py,
# test_device_path.py) under compute-sanitizer's memcheck and racecheck (logs: sanitize-*.log);
# expect it to take minutes.
#
# Needs the GPU image's build tools (cmake, ninja, nvcc, pybind11, scikit-build-core, torch).
# scipy-openblas32 is installed from .whl/ when the machine lacks it (no index is reached).
# Results go to DIR (default benchmarks/results/<date>-<gpu>/), plus $OUT when that is set;
# the suite also rewrites the results section of benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
RESULTS=""
DRY=0
TESTS=1
BENCH=1
SUITE_ARGS=()
SANITIZE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --results) RESULTS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --skip-tests) TESTS=0; shift ;;
    --skip-bench) BENCH=0; shift ;;
    --quick) SUITE_ARGS+=(--quick); shift ;;
    --only) SUITE_ARGS+=(--only "$2"); shift 2 ;;
    --sanitize) SANITIZE=1; shift ;;
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
done

step() { printf '\n=== %s ===\n' "$*"; }

if [ "$DRY" = 1 ]; then
  [ -n "$RESULTS" ] || { echo "gpu-check: --dry-run needs --results DIR" >&2; exit 2; }
  step "dry run: benchmark suite on the CPU (tiny shapes; the installed pregated)"
  exec "$PY" -m pregated.suite --dry-run --results "$RESULTS" --readme "" ${SUITE_ARGS[@]+"${SUITE_ARGS[@]}"}
fi

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || {
  echo "gpu-check: nvidia-smi failed: this machine has no usable NVIDIA GPU" >&2; exit 1; }
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_.-')
RESULTS=${RESULTS:-benchmarks/results/$(date +%F)-$GPU}
mkdir -p "$RESULTS"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda)"
nvcc --version | tail -1
echo "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

step "build (CUDA required)"
if ! "$PY" -c "import scipy_openblas32" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps .whl/scipy_openblas32-*.whl
fi
"$PY" -m pip install --no-build-isolation --no-deps -C build-dir=build/gpu \
  -C cmake.define.PREGATED_CUDA=ON \
  -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=${PREGATED_CUDA_ARCHS:-90}" . 2>&1 | tail -3
"$PY" -c "
import pregated
info = pregated.build_info()
print(info)
assert info['cuda'] and info['cuda_devices'] > 0, 'the CUDA backend is not usable'
"

status=0
export PREGATED_RESULTS_DIR="$RESULTS"
if [ "$TESTS" = 1 ]; then
  step "GPU tests"
  set +e
  (cd tests && "$PY" -m pytest -m gpu -v -rs -s -p no:cacheprovider .) 2>&1 | tee "$RESULTS/gpu-tests.log"
  status=${PIPESTATUS[0]}
  set -e
fi
if [ "$SANITIZE" = 1 ]; then
  step "compute-sanitizer on the runtime's GPU tests"
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [ -x "$SAN" ]; then
    for tool in memcheck racecheck; do
      set +e
      (cd tests && "$SAN" --tool "$tool" --error-exitcode 3 --target-processes all \
        "$PY" -m pytest -m gpu -q -p no:cacheprovider test_runtime_gpu.py test_resident.py test_device_path.py) 2>&1 \
        | tee "$RESULTS/sanitize-$tool.log"
      san_status=${PIPESTATUS[0]}
      set -e
      [ "$san_status" = 0 ] || status=$san_status
    done
  else
    echo "gpu-check: compute-sanitizer not found (looked on PATH and in /usr/local/cuda/bin): skipped" \
      | tee "$RESULTS/sanitize-skipped.log"
  fi
fi
if [ "$BENCH" = 1 ]; then
  step "a miss on the device path (read in place) against a copy (planned path)"
  set +e
  "$PY" benchmarks/tools/read_in_place.py --device cuda --out "$RESULTS/read-in-place.json" 2>&1 \
    | tee "$RESULTS/read-in-place.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  step "benchmark suite"
  "$PY" -m pregated.suite --results "$RESULTS" ${SUITE_ARGS[@]+"${SUITE_ARGS[@]}"} 2>&1 | tee -a "$RESULTS/bench-suite.log"
  bench_status=${PIPESTATUS[0]}
  set -e
  [ "$bench_status" = 0 ] || status=$bench_status
fi

if [ -n "${OUT:-}" ]; then cp -r "$RESULTS"/. "$OUT"/ 2>/dev/null || true; fi
step "done: results in $RESULTS (tests exit $status)"
exit "$status"
