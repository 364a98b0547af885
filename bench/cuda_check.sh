#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run on a machine that has one and
# a python3 with a CUDA torch (no venv, no network: the extension is built
# with that python's cmake, ninja and pybind11). Writes its logs to $OUT
# (default ./out/cuda). From the repo root:
#
#     bash bench/cuda_check.sh [--no-suite]
#
# 1. builds the extension for that python; 2. the CUDA tests (tests/test_cuda.py
# and every test marked for CUDA); 3. bench/cuda_speed.py (MinkUNet on ~85k
# voxels on the GPU against this machine's CPU); 4. unless --no-suite, the
# whole suite with CUDA visible (the CLI's --device default is cuda there),
# spread over the cores with pytest-xdist.
set -u -o pipefail
OUT=${OUT:-out/cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
nvidia-smi -L
$PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
t0=$SECONDS
if ! { cmake -S . -B build/cuda-check -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v $PY)" \
         -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" && cmake --build build/cuda-check -j "$(nproc)"; } > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; echo "build failed"; exit 1
fi
cp build/cuda-check/_core*.so pointsparse/
echo "built in $((SECONDS - t0)) s"
t0=$SECONDS
$PY -m pytest -q -p no:cacheprovider -rfEs tests/test_cuda.py tests/test_conv.py::test_cuda_equals_cpu \
  tests/test_kmap.py::test_torch_method_on_cuda tests/test_tensor.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -40
echo "CUDA tests: $((SECONDS - t0)) s"
t0=$SECONDS
timeout 150 $PY bench/cuda_speed.py --rounds 5 --out "$OUT/cuda_speed.md" 2>&1 | tail -20
echo "speed: $((SECONDS - t0)) s"
if [ "${1:-}" != "--no-suite" ]; then
  t0=$SECONDS
  OMP_NUM_THREADS=1 timeout "${SUITE_LIMIT:-240}" $PY -m pytest -q -p no:cacheprovider -n "$(( $(nproc) - 2 ))" \
    --timeout 150 -rfE tests 2>&1 | tee "$OUT/suite.log" | grep -E "^(FAILED|ERROR)|passed|failed" | tail -60
  echo "suite: $((SECONDS - t0)) s"
fi
