#!/usr/bin/env bash
# Install what the tests need (on a fresh machine too), build pregated and run every test:
# pytest (GPU tests skip with a reason where there is no GPU), then the C++ core's tests
# plain, under ThreadSanitizer and under AddressSanitizer.
#
#   scripts/test.sh            PREGATED_CUDA=ON scripts/test.sh  (fail if CUDA does not build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { printf '\n=== %s ===\n' "$*"; }

step "dependencies"
# An unpinned torch resolves to a multi-GB CUDA build: keep one that is there, else the CPU 2.13.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q scikit-build-core pybind11 ninja scipy-openblas32 numpy safetensors \
  tokenizers tqdm pytest "transformers==5.24.0" jinja2 matplotlib fastapi uvicorn openai httpx schemathesis
if command -v nvcc >/dev/null && [ "${PREGATED_CUDA:-AUTO}" != OFF ]; then
  # nvcc without cuBLAS (as on our CI machines): headers and libraries from the wheel.
  "$PY" -c "import os, nvidia; assert any(os.path.isfile(os.path.join(p, 'cu13/include/cublas_v2.h')) for p in nvidia.__path__)" 2>/dev/null \
    || "$PY" -m pip install -q --no-deps nvidia-cublas
fi

step "build and install"
"$PY" -m pip install -q --no-build-isolation --no-deps -C "cmake.define.PREGATED_CUDA=${PREGATED_CUDA:-AUTO}" .
"$PY" -c "import pregated; print(pregated.build_info())"

step "pytest"
(cd tests && "$PY" -m pytest -q -rs --durations=10 .)

step "C++ tests (plain, thread sanitizer, address sanitizer)"
for san in none thread address; do
  dir=build/ctest-$san
  flags=(-DPREGATED_TESTS=ON -DPREGATED_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython_EXECUTABLE="$(command -v "$PY")")
  [ "$san" != none ] && flags+=(-DPREGATED_SANITIZE=$san)
  cmake -S . -B "$dir" -G Ninja "${flags[@]}" >/dev/null
  cmake --build "$dir" >/dev/null
  echo "--- $san"
  TSAN_OPTIONS=halt_on_error=1 ASAN_OPTIONS=detect_leaks=1 "$dir/tests/cpp/pregated_tests" | tail -2
done
step "all tests passed"
