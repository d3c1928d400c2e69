#!/usr/bin/env bash
# The oldest torch fusedres is tested on, rehearsed on the CPU: the wheel built against the torch
# this project develops on (2.14.1), installed into a venv with torch 2.11.0 (what the borrowed GPU
# machines have: Python 3.12, torch 2.11.0+cu130, triton 3.6.0), then `python -m fusedres` (_C must
# load) and the whole test suite, as the Quickstart runs it. ci.yml's oldest-torch job runs this.
#
#   bash scripts/rehearse_oldest_torch.sh
#
#   1. the wheel: WHEEL if given, else scripts/build_wheel.sh into DIST with BUILD_PYTHON (default
#      .venv-build/bin/python, made here as scripts/install.sh makes it when missing: torch 2.14.1
#      and pyproject's dev extra).
#   2. VENV (.venv-torch2.11, kept between runs) from PYTHON (python3.12 when there is one, else
#      python3): torch==TORCH_OLD (2.11.0: on PyPI the CUDA 13 build, which pulls triton 3.6.0),
#      torchvision==TORCHVISION_OLD (0.26.0, its match), the test and bench extras, numpy<2.4.
#   3. the wheel into VENV (--no-deps --force-reinstall: torch stays), named in
#      VENV/fusedres-wheel.txt for tests/test_packaging.py, as scripts/install.sh does.
#   4. `python -P -m fusedres`, then `PYTHONSAFEPATH=1 python -m pytest tests -q` (PYTEST_ARGS adds
#      arguments; without a GPU conftest sets TRITON_INTERPRET=1, so the Triton kernels run in
#      triton 3.6's interpreter).
#
# Environment: PYTHON, VENV, TORCH_OLD, TORCHVISION_OLD, WHEEL, BUILD_PYTHON, DIST (dist),
# PYTEST_ARGS, and build_wheel.sh's switches (FUSEDRES_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  command -v python3.12 >/dev/null && python3.12 -c '' 2>/dev/null && PYTHON=python3.12
fi
venv=${VENV:-.venv-torch2.11}
torch_old=${TORCH_OLD:-2.11.0}
torchvision_old=${TORCHVISION_OLD:-0.26.0}
build_python=${BUILD_PYTHON:-.venv-build/bin/python}
dist=${DIST:-dist}

step() { echo && echo "== rehearse_oldest_torch [$SECONDS s]: $*"; }
run() { echo "+ $*" && "$@"; }

extras() { # the named optional-dependency groups of pyproject.toml, one requirement a line
  "$PYTHON" - "$@" <<'EOF'
import sys
import tomllib

groups = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
print("\n".join(d for g in sys.argv[1:] for d in groups[g]))
EOF
}

wheel=${WHEEL:-}
if [ -z "$wheel" ]; then
  if [ ! -x "$build_python" ]; then
    step "build environment ${build_python%/bin/python} (torch 2.14.1 + the dev extra)"
    run "$PYTHON" -m venv "${build_python%/bin/python}"
    mapfile -t dev < <(extras dev)
    run "$build_python" -m pip install -q torch==2.14.1 "${dev[@]}"
  fi
  step "the wheel, against $("$build_python" -c 'import torch; print(torch.__version__)')"
  PYTHON=$build_python run bash scripts/build_wheel.sh "$dist"
  wheel=$(ls "$dist"/fusedres-*.whl)
fi

step "$venv: $("$PYTHON" --version), torch==$torch_old, torchvision==$torchvision_old, the test and bench extras"
[ -x "$venv/bin/python" ] || run "$PYTHON" -m venv "$venv"
mapfile -t test_deps < <(extras test bench | grep -v -E '^torchvision\b')
# numpy<2.4: triton 3.6's interpreter turns one-element arrays (program ids, scalar arguments)
# into Python ints with int(), which numpy 2.4 refuses ("only 0-dimensional arrays can be
# converted to Python scalars"; 1.25 to 2.3 only warn; triton 3.8 squeezes the arrays first): every
# loop with a run-time bound in a Triton kernel would fail under TRITON_INTERPRET=1.
run "$venv/bin/python" -m pip install -q "torch==$torch_old" "torchvision==$torchvision_old" "${test_deps[@]}" "numpy<2.4"
run "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$wheel"
basename "$wheel" >"$venv/fusedres-wheel.txt"

step "the installed fusedres under torch $torch_old"
run "$venv/bin/python" -P -m fusedres
"$venv/bin/python" -P -c 'import sys, fusedres; sys.exit(None if fusedres.EXTENSION_LOADED else "fusedres._C did not load")'

step "the tests"
# PYTEST_ARGS is split on spaces on purpose: several arguments.
# shellcheck disable=SC2086
PYTHONSAFEPATH=1 run "$venv/bin/python" -m pytest tests -q ${PYTEST_ARGS:-}
step "done: $(basename "$wheel") passes under torch $torch_old"
