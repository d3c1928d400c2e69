#!/usr/bin/env bash
# Quickstart, first command (README.md; .ci/run runs it): build fusedres's wheel, check it, and
# install it into a fresh .venv, so that everything after runs the installed wheel.
#
#   1. .venv-build (kept between runs): torch and the `dev` extra of pyproject.toml (setuptools,
#      wheel, ninja, build, ruff, clang-format); lint with ruff check + ruff format --check and
#      clang-format --dry-run on csrc/ (FUSEDRES_LINT=0 skips).
#   2. scripts/build_wheel.sh: the sdist, the wheel built from it (CUDA kernels when nvcc is found;
#      required under CI=true unless FUSEDRES_CUDA says otherwise), scripts/check_wheel.py.
#   3. .venv, made afresh: torch and the wheel with its [test,bench] extras. .venv/fusedres-wheel.txt
#      names the wheel: tests/test_packaging.py then checks that the tests import it, not the checkout.
#
# Environment: PYTHON (python3; >= 3.11 for the Quickstart's `python -P`), TORCH_SPEC
# (torch==2.14.1), BUILD_VENV (.venv-build), VENV (.venv), FUSEDRES_LINT, and build_wheel.sh's
# switches (FUSEDRES_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.14.1}
build_venv=${BUILD_VENV:-.venv-build}
venv=${VENV:-.venv}

step() { echo; echo "== install.sh [$SECONDS s]: $*"; }
run() { echo "+ $*"; "$@"; }

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "fusedres needs Python >= 3.10" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  echo "install.sh: note: $("$python" --version) has no -P/PYTHONSAFEPATH; run the tests from outside the checkout"

step "build environment $build_venv ($torch_spec + the dev extra)"
[ -x "$build_venv/bin/python" ] || run "$python" -m venv "$build_venv"
mapfile -t dev_deps < <("$build_venv/bin/python" - <<'EOF'
import re

text = open("pyproject.toml").read()
try:
    import tomllib

    deps = tomllib.loads(text)["project"]["optional-dependencies"]["dev"]
except ModuleNotFoundError:  # Python 3.10
    deps = re.findall(r'"([^"]+)"', re.search(r"^dev = \[(.*)\]$", text, re.M)[1])
print("\n".join(deps))
EOF
)
run "$build_venv/bin/pip" install -q "$torch_spec" "${dev_deps[@]}"

if [ "${FUSEDRES_LINT:-1}" = 1 ]; then
  step "lint"
  run "$build_venv/bin/ruff" check .
  run "$build_venv/bin/ruff" format --check .
  # C++/CUDA: csrc/ as .clang-format says (fix with the same command's -i instead of --dry-run)
  git ls-files -z -- 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' \
    | xargs -0 "$build_venv/bin/clang-format" --dry-run --Werror
fi

step "build and check the wheel"
if [ "${CI:-}" = true ] && [ -z "${FUSEDRES_CUDA:-}" ]; then
  export FUSEDRES_CUDA=1  # CI checks the CUDA kernels (sm_80, sm_90, PTX): fail rather than skip them
fi
PYTHON="$build_venv/bin/python" run bash scripts/build_wheel.sh dist
wheels=(dist/fusedres-*.whl)
wheel=${wheels[0]}

step "fresh $venv with $torch_spec and $wheel[test,bench]"
run rm -rf "$venv"
run "$python" -m venv "$venv"
run "$venv/bin/pip" install -q "$torch_spec" "$wheel[test,bench]"
basename "$wheel" >"$venv/fusedres-wheel.txt"

step "the installed fusedres"
# -P: the checkout stays off sys.path, so this is the installed wheel.
run "$venv/bin/python" -P -m fusedres
"$venv/bin/python" -P -c 'import sys, fusedres; sys.exit(None if fusedres.EXTENSION_LOADED else "fusedres._C did not load")'
step "done: $wheel installed in $venv"
