#!/usr/bin/env bash
# Builds fusedres's sdist, then the wheel from that sdist (so every build also proves the sdist is
# complete), into DIST_DIR (default dist/), and checks the wheel with scripts/check_wheel.py.
# The one build script: scripts/install.sh (so .ci/run) and .github/workflows/wheels.yml run it.
#
#   PYTHON=.venv-build/bin/python bash scripts/build_wheel.sh [DIST_DIR]
#
# PYTHON (default python3) must have torch, setuptools, wheel, ninja and build (the `dev` extra):
# there is no build isolation, the extension is compiled against the torch that PYTHON has.
# Honoured: FUSEDRES_CUDA (default here: 1 when nvcc is found and torch has CUDA, else 0),
# TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME (defaults as for setup.py: build_config.py),
# FUSEDRES_LOCAL_VERSION (e.g. cu13: version 0.1.0+cu13), SOURCE_DATE_EPOCH.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
dist=${1:-dist}

# The defaults and the CUDA decision are setup.py's, from build_config.py (not repeated here).
config() { "$python" build_config.py "$1"; }
cuda_home=$(config cuda-home)
if [ -n "$cuda_home" ]; then
  export CUDA_HOME=$cuda_home
fi
TORCH_CUDA_ARCH_LIST=$(config arch-list)
export TORCH_CUDA_ARCH_LIST
# A wheel build says what it makes: auto becomes 1 (CUDA kernels required) when they can be built,
# else 0; FUSEDRES_CUDA=1 that cannot be met fails here, before anything is built.
FUSEDRES_CUDA=$(config cuda-mode)
export FUSEDRES_CUDA
torch_version=$("$python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')
echo "build_wheel: torch $torch_version; FUSEDRES_CUDA=$FUSEDRES_CUDA CUDA_HOME=${CUDA_HOME:-none}" \
  "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-all cores} -> $dist/"

mkdir -p "$dist"
rm -f "$dist"/fusedres-*.whl "$dist"/fusedres-*.tar.gz
start=$SECONDS
# No isolation: a build environment would fetch its own torch, not the one this wheel is for.
"$python" -m build --no-isolation --outdir "$dist" .
echo "build_wheel: built in $((SECONDS - start)) s: $(ls "$dist"/fusedres-*)"

check_args=()
if [ "$FUSEDRES_CUDA" = 1 ]; then
  check_args=(--require-cuda --archs "$TORCH_CUDA_ARCH_LIST")
fi
"$python" scripts/check_wheel.py "$dist"/fusedres-*.whl --sdist "$dist"/fusedres-*.tar.gz "${check_args[@]}"
