#!/usr/bin/env bash
# The GPU checks, as one script: .github/workflows/gpu.yml runs it after scripts/install.sh (the
# installed wheel), and it serves a borrowed GPU machine (torch + triton + nvcc but no package
# registry) too: there, build fusedres/_C.abi3.so on the CPU machine first (the Quickstart, or
# `pip install --no-build-isolation -e .`) and carry it with fusedres/_build_info.py: the
# stable-ABI build loads on any torch >= 2.10. Everything lands in $OUT (default ./gpu-out).
#
#   [PYTHON=.venv/bin/python] bash scripts/gpu_check.sh [quick|full]
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-quick}
out=${OUT:-gpu-out}
py=${PYTHON:-python}
mkdir -p "$out"
status=0

# An installed fusedres (scripts/install.sh's .venv) is what runs when there is one: PYTHONSAFEPATH
# keeps the checkout off sys.path, here and in every Python the tests start. Else the checkout.
if "$py" -P -c 'import fusedres' 2>/dev/null; then
  export PYTHONSAFEPATH=1
fi

"$py" -m fusedres | tee "$out/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee -a "$out/env.txt"

# Every test, CUDA and Triton backends included (the gpu-marked ones run here).
"$py" -m pytest tests -q -x -m gpu -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.txt" || status=1

if [ "$mode" = full ]; then
  "$py" -m pytest tests -q -p no:cacheprovider 2>&1 | tail -3 | tee "$out/all-tests.txt" || status=1
  # Memory errors and races in the CUDA kernels, on small shapes through the CUDA backend.
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 \
      "$py" -m pytest tests/test_add_norm.py tests/test_batch_norm.py -q -x -k "cuda-cuda and float32" \
      -p no:cacheprovider 2>&1 | tail -5 | tee "$out/sanitizer-$tool.txt" || status=1
  done
fi

"$py" -m fusedres.bench "--$mode" --out "$out/bench" 2>&1 | tee "$out/bench.txt" || status=1
exit $status
