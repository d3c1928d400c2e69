#!/usr/bin/env bash
# The GPU checks in one command, sized for a borrowed GPU machine's slot (about 8 minutes on an
# H200) and run by .github/workflows/gpu.yml on a self-hosted runner (--full). Every step has its
# own time limit inside one overall budget, a failing step does not stop the next, and a table of
# step, status and seconds closes the run (also in summary.md).
#
#   [PYTHON=python3] [OUT=gpu-out] bash scripts/gpu_check.sh [--dry-run | --full] [--steps a,b,...]
#
# Steps (--steps picks some, by name):
#   install           pip install --no-index --no-deps --target <work>/site wheels/*.whl (the fusedres
#                     wheel and the peers; the machine's torch and triton stay), PYTHONPATH to it;
#                     without wheels/, the fusedres that PYTHON already imports. _C must load.
#   env               python -m fusedres, nvidia-smi, versions, compute-sanitizer --version
#   gpu-tests         pytest -m gpu: the CUDA and Triton backends, every dtype (test_cuda_graphs apart)
#   cuda-graphs       tests/test_cuda_graphs.py: every op captured in a torch.cuda.graph, fwd + bwd,
#                     replayed on new inputs; torch.compile(mode="reduce-overhead") of small models
#   triton-launchers  tests/test_triton_launchers.py on CUDA tensors (and the sm_90 compile check)
#   bench-add-norm    add_layer_norm (post-norm) and add_rms_norm (pre-norm), bf16, 16384 x
#                     {768, 1024, 4096, 8192}, fwd+bwd: eager, torch.compile, fusedres-cuda/-triton, liger
#   bench-bn          batch_norm_add_relu train, bf16 channels_last, ResNet-50's four stages at batch 256
#   overhead          python -m fusedres.bench --overhead --quick: host us and kernel launches per call
#   memcheck          compute-sanitizer --tool memcheck over the CUDA backend's parity tests (float32)
#   racecheck         the same with --tool racecheck; both skip, with a note, where the device is
#                     refused ("Device not supported": gVisor machines)
#
# --dry-run runs every step in its CPU form on a tiny subset (no GPU needed, a few minutes on two
# cores) and writes the same files, so the script, the paths and the output limits are proven
# before a GPU slot is spent. --full (self-hosted runner): the whole test suite, the bench's --full
# set and --overhead, with a budget of two hours.
#
# What lands in $OUT (at most 8 files, nothing deeper than $OUT/a/b/file, as the device tool
# brings back): summary.md, results.json + results.md (the bench's schema: both bench steps
# merged), overhead.md, up to two plots, and logs.tar.gz (every step's log, pytest's junit XML, the
# per-step bench files, the overhead JSON, all plots). The limits are checked at the end: the
# script exits 2 if they are broken, 1 if a step failed or ran out of time, else 0.
#
# On a borrowed GPU machine (torch + triton + nvcc + pytest but no package registry), from the
# CPU machine's checkout:
#   1. the wheel:  PYTHON=.venv-build/bin/python bash scripts/build_wheel.sh dist
#                  (or scripts/install.sh; one abi3 wheel serves every torch >= 2.10 of CUDA 13)
#   2. wheels/:    bash scripts/fetch_peer_wheels.sh dist/fusedres-*.whl
#                  (git-ignored; the fusedres wheel and liger-kernel, about 8 MB)
#   3. send the tree with wheels/ (the device tool's carry: ["wheels"]) and run, as one command:
#                  bash scripts/gpu_check.sh
#      with a timeout_s of about 560 (the budget below is 480 s, packing and pip after it).
#
# Environment: PYTHON (python3), OUT (gpu-out), WHEELS (wheels), GPU_CHECK_BUDGET (seconds: 480;
# --dry-run 300; --full 7200), GPU_CHECK_WORKERS (pytest-xdist workers where it is installed: 8),
# COMPUTE_SANITIZER (compute-sanitizer on PATH, else $CUDA_HOME/bin/compute-sanitizer).

MAX_FILES=8 # what the device tool brings back from $OUT
MAX_DEPTH=2 # folders below $OUT
MAX_FILE_BYTES=$((16 * 1024 * 1024))
MAX_TOTAL_BYTES=$((64 * 1024 * 1024))
KEEP_PLOTS=2 # plots copied next to results.md; all of them are in logs.tar.gz
MIN_STEP_SECONDS=15 # the least a step is started with; each later step keeps this much in reserve

# name:seconds, in the order run. The seconds are each step's own limit on an H200; the overall
# budget cuts them further when the steps before ran long.
STEPS=(
  install:60
  env:30
  gpu-tests:150
  cuda-graphs:60
  triton-launchers:60
  bench-add-norm:120
  bench-bn:60
  overhead:45
  memcheck:60
  racecheck:60
)

# --- the checks on $OUT and the packing (tests/test_gpu_check_script.py runs these alone) ---------

# Prints what breaks the device tool's limits on what comes back from DIR; fails if anything does.
check_out_limits() {
  local dir=$1 problems=() files total
  files=$(find "$dir" -mindepth 1 -type f | wc -l)
  ((files > MAX_FILES)) && problems+=("$files files, more than $MAX_FILES")
  if [ -n "$(find "$dir" -mindepth $((MAX_DEPTH + 2)) -print -quit)" ]; then
    problems+=("something is more than $MAX_DEPTH folders down: $(find "$dir" -mindepth $((MAX_DEPTH + 2)) -print -quit)")
  fi
  local odd
  odd=$(find "$dir" -mindepth 1 ! -type f ! -type d -print -quit)
  [ -n "$odd" ] && problems+=("not a plain file or folder: $odd")
  odd=$(find "$dir" -mindepth 1 -name '*[!A-Za-z0-9._-]*' -print -quit)
  [ -n "$odd" ] && problems+=("a name with characters other than letters, digits, '.', '_', '-': $odd")
  odd=$(find "$dir" -type f -size +$((MAX_FILE_BYTES / 1024))k -print -quit)
  [ -n "$odd" ] && problems+=("over $((MAX_FILE_BYTES / 1024 / 1024)) MiB: $odd")
  total=$(find "$dir" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
  ((total > MAX_TOTAL_BYTES)) && problems+=("$total bytes in all, more than $MAX_TOTAL_BYTES")
  if ((${#problems[@]})); then
    printf 'output limits: %s\n' "${problems[@]}"
    return 1
  fi
  echo "output limits: ok ($files files, $total bytes, at most $MAX_DEPTH folders down)"
}

# From the work folder STAGE to OUT: the files to read first at the top, everything else in
# logs.tar.gz. Only the names listed here are written (or removed first) in OUT.
pack_outputs() {
  local stage=$1 out=$2 plots=() p
  mkdir -p "$out"
  rm -f "$out"/{summary.md,results.json,results.md,overhead.md,logs.tar.gz} "$out"/results-*.png
  [ -f "$stage/summary.md" ] && cp "$stage/summary.md" "$out/"
  [ -f "$stage/bench/results.json" ] && cp "$stage/bench/results.json" "$stage/bench/results.md" "$out/"
  [ -f "$stage/overhead/results-overhead.md" ] && cp "$stage/overhead/results-overhead.md" "$out/overhead.md"
  # The first plot of each bench step (they are copied into bench/ too, with all the others).
  for p in "$stage"/bench-*/; do
    [ -d "$p" ] || continue
    p=$(find "$p" -maxdepth 1 -name 'results-*.png' | sort | head -n 1)
    [ -n "$p" ] && ((${#plots[@]} < KEEP_PLOTS)) && plots+=("$p")
  done
  for p in "${plots[@]}"; do cp "$p" "$out/"; done
  # Everything in the work folder but the pip target and caches.
  tar -czf "$out/logs.tar.gz" -C "$stage" --exclude=./site --exclude=./cache .
}

# The verdict on a compute-sanitizer run from its log and exit code, as one line: "ok: ...",
# "skip: ..." (the device or machine refuses the tool; returns 77) or "fail: ..." (returns 1).
sanitizer_verdict() {
  local log=$1 rc=$2
  if grep -q -e "Device not supported" -e "Target application terminated before first instrumented API call" "$log"; then
    echo "skip: compute-sanitizer cannot attach here ($(grep -m1 -o -e 'Device not supported' -e 'Target application terminated[^.]*' "$log"))"
    return 77
  fi
  if [ "$rc" = 0 ] && grep -q "ERROR SUMMARY: 0 errors" "$log"; then
    echo "ok: compute-sanitizer found no errors"
    return 0
  fi
  echo "fail: exit code $rc; $(grep -m1 -o 'ERROR SUMMARY: [0-9]* errors*' "$log" || echo "no ERROR SUMMARY")"
  return 1
}

# --- the steps ------------------------------------------------------------------------------------
# Each runs as `bash -c step_<name, - as _>` under `timeout`, its output in logs/<name>.log. Exit 0 is ok,
# 77 a skip (its last line says why), anything else a failure.

pytest_() { "$py" -m pytest -q -p no:cacheprovider -rfE "$@"; }

# pytest-xdist's workers, where it is installed (the H200 machines have it): Triton compiles each
# kernel specialization on first use, on one core per process, and the tests ask for hundreds.
workers_() {
  if [ "$mode" != dry ] && "$py" -c 'import xdist' 2>/dev/null; then
    echo "-n ${GPU_CHECK_WORKERS:-8}"
  fi
}

step_install() {
  local wheels_=() w
  mapfile -t wheels_ < <(find "$wheels" -maxdepth 1 -name '*.whl' 2>/dev/null | sort)
  if ((${#wheels_[@]} == 0)); then
    echo "no wheels in $wheels/: using the fusedres that $py imports"
  else
    for w in "${wheels_[@]}"; do
      case $(basename "$w") in
        torch-* | triton-*) echo "refusing $w: the machine's torch and triton must stay" && return 1 ;;
      esac
    done
    printf 'installing %s\n' "${wheels_[@]##*/}"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels_[@]}" || return 1
  fi
  "$py" -P - <<'EOF'
import sys

import fusedres

print(f"fusedres {fusedres.__version__} from {fusedres.__file__}")
for peer in ("liger_kernel",):
    try:
        __import__(peer)
        print(f"{peer}: imports")
    except Exception as e:  # a peer is optional: the bench notes it
        print(f"{peer}: does not import ({type(e).__name__}: {e})")
if not fusedres.EXTENSION_LOADED:
    sys.exit(f"fusedres._C did not load: {fusedres.EXTENSION_ERROR}")
print("fusedres._C loaded")
EOF
}

step_env() {
  "$py" -m fusedres | tee "$stage/fusedres-env.txt"
  ((PIPESTATUS[0] == 0)) || return 1
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.memory --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  "$py" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|torchvision|transformers|timm|liger.kernel|pytest|numpy|matplotlib) ' || true
  echo "compute-sanitizer: $(sanitizer_version)"
}

sanitizer_version() {
  if command -v "$sanitizer" >/dev/null; then
    "$sanitizer" --version 2>&1 | grep -m1 -i version || echo "$sanitizer (no version)"
  else
    echo "$sanitizer not found"
  fi
}

step_gpu_tests() {
  if [ "$mode" = dry ]; then
    pytest_ tests/test_add_norm.py tests/test_batch_norm.py -k "test_matches_fp64_reference and cpu-cpu and float32"
  elif [ "$mode" = full ]; then
    # shellcheck disable=SC2046 # workers_ prints two words or none
    pytest_ tests $(workers_) --durations=20 --junitxml="$stage/junit-tests.xml"
  else
    # shellcheck disable=SC2046
    pytest_ tests -m gpu --ignore=tests/test_cuda_graphs.py $(workers_) --maxfail=50 --durations=15 \
      --junitxml="$stage/junit-gpu-tests.xml"
  fi
}

step_cuda_graphs() {
  # On the CPU every test skips ("needs a CUDA GPU"): the dry run proves the file imports.
  pytest_ tests/test_cuda_graphs.py --junitxml="$stage/junit-cuda-graphs.xml"
}

step_triton_launchers() {
  if [ "$mode" = dry ]; then
    pytest_ tests/test_triton_launchers.py -k "test_add_norm_matches_reference and float32 and layer"
  else
    # shellcheck disable=SC2046
    pytest_ tests/test_triton_launchers.py $(workers_) --durations=5 --junitxml="$stage/junit-triton-launchers.xml"
  fi
}

bench_() { # DIR, then the bench's arguments
  local dir=$1
  shift
  if [ "$mode" = dry ]; then
    set -- --smoke --providers eager fusedres --reps 3 --warmup 1 "$@"
  fi
  "$py" -m fusedres.bench --out "$stage/$dir" --no-progress "$@" || return
  "$py" - "$stage/$dir/results.json" <<'EOF'
import sys

from fusedres.bench import report

results = report.read_json(sys.argv[1])
verdicts = [report.verdict(p) for p in results["parity"] if p.get("judged")]
cases = len({r["case"] for r in results["timings"]})
print(f"ok: {cases} cases, {len(results['timings'])} timings, parity {verdicts.count('ok')}/{len(verdicts)} ok")
EOF
}

step_bench_add_norm() {
  if [ "$mode" = dry ]; then
    bench_ bench-add-norm --ops add_norm --directions fwd+bwd
  elif [ "$mode" = full ]; then
    bench_ bench-add-norm --full --ops add_norm
  else
    local n shapes=()
    for n in 768 1024 4096 8192; do
      shapes+=("add_layer_norm 16384x$n bfloat16" "add_rms_norm/prenorm 16384x$n bfloat16")
    done
    bench_ bench-add-norm --full --ops add_norm --shapes "${shapes[@]}" --directions fwd+bwd
  fi
}

step_bench_bn() {
  if [ "$mode" = dry ]; then
    bench_ bench-bn --ops batch_norm --directions fwd+bwd
  elif [ "$mode" = full ]; then
    bench_ bench-bn --full --ops batch_norm
  else
    local stage_ shapes=()
    for stage_ in 256x256x56x56 256x512x28x28 256x1024x14x14 256x2048x7x7; do
      shapes+=("bn_add_relu/train $stage_ cl bfloat16")
    done
    bench_ bench-bn --full --ops batch_norm --shapes "${shapes[@]}" --directions fwd+bwd
  fi
}

step_overhead() {
  local size=--quick
  [ "$mode" = dry ] && size=--smoke
  [ "$mode" = full ] && size=--full
  "$py" -m fusedres.bench --overhead "$size" --out "$stage/overhead" --name results
}

sanitize_() { # TOOL
  local tool=$1 log="$stage/$1.raw.log" rc verdict
  if [ "$mode" = dry ]; then
    echo "dry run: the CPU form of the $tool subset, without compute-sanitizer ($(sanitizer_version))"
    pytest_ tests/test_add_norm.py -k "test_matches_fp64_reference and cpu-cpu and float32 and rms"
    return
  fi
  if ! command -v "$sanitizer" >/dev/null; then
    echo "skip: $sanitizer not found"
    return 77
  fi
  if [ -f "$stage/sanitizer.skipped" ]; then
    cat "$stage/sanitizer.skipped" # memcheck found the tool refused here
    return 77
  fi
  # Small shapes through the CUDA backend; no caching allocator, so memcheck sees each tensor's
  # own bounds.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 --print-limit 20 \
    "$py" -m pytest -q -p no:cacheprovider tests/test_add_norm.py tests/test_batch_norm.py \
    -k "test_matches_fp64_reference and cuda-cuda and float32" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  verdict=$(sanitizer_verdict "$log" "$rc")
  rc=$?
  echo "$verdict"
  [ "$rc" = 77 ] && echo "$verdict" >"$stage/sanitizer.skipped"
  return "$rc"
}

step_memcheck() { sanitize_ memcheck; }
step_racecheck() { sanitize_ racecheck; }

# --- running them ---------------------------------------------------------------------------------

# Merges the two bench steps' results into one results.json / results.md in the bench's schema.
merge_bench() {
  "$py" -P - "$stage" <<'EOF'
import glob
import os
import shutil
import sys

from fusedres.bench import report

stage = sys.argv[1]
parts = [report.read_json(p) for p in sorted(glob.glob(os.path.join(stage, "bench-*", "results.json")))]
if not parts:
    sys.exit("no bench results to merge")
out = os.path.join(stage, "bench")
os.makedirs(out, exist_ok=True)
plots = []
for step_dir in sorted(glob.glob(os.path.join(stage, "bench-*"))):
    for png in sorted(glob.glob(os.path.join(step_dir, "*.png"))):
        shutil.copy(png, out)
        plots.append(os.path.basename(png))
merged = report.results_dict(
    parts[0]["environment"],
    {"runs": [p["args"] for p in parts]},
    [row for p in parts for row in p["parity"]],
    [row for p in parts for row in p["timings"]],
    list(dict.fromkeys(n for p in parts for n in p["notes"])),
    plots,
)
report.write_json(os.path.join(out, "results.json"), merged)
report.write_markdown(os.path.join(out, "results.md"), merged)
print(f"merged {len(parts)} bench run(s): {len(merged['timings'])} timings, {len(plots)} plot(s)")
EOF
}

# The line that says how a step went: pytest's closing counts, else its log's last line; then a
# verdict line ("ok: ", "skip: ", "fail: ") where the step printed one.
step_detail() {
  local log=$1 line verdict
  line=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran' "$log" | tail -n 1)
  [ -z "$line" ] && line=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)
  line=$(echo "${line//=/}" | sed -e 's/^ *//' -e 's/ *$//')
  verdict=$(grep -E '^(ok|skip|fail): ' "$log" | tail -n 1)
  [ -n "$verdict" ] && [ "$verdict" != "$line" ] && line="$line; $verdict"
  line=${line//|/\\|}
  echo "${line:0:140}"
}

record() { # name status seconds detail
  names+=("$1")
  statuses+=("$2")
  seconds+=("$3")
  details+=("$4")
}

run_steps() {
  local selected=() entry i name cap limit left reserve rc start log
  for entry in "${STEPS[@]}"; do
    if [ -z "$only" ] || [[ ",$only," == *",${entry%%:*},"* ]]; then
      selected+=("$entry")
    fi
  done
  for i in "${!selected[@]}"; do
    name=${selected[$i]%%:*}
    cap=${selected[$i]##*:}
    ((full)) && cap=$((cap * 10))
    reserve=$(((${#selected[@]} - i - 1) * MIN_STEP_SECONDS))
    left=$((deadline - SECONDS))
    limit=$((cap < left - reserve ? cap : left - reserve))
    if ((limit < MIN_STEP_SECONDS)); then
      record "$name" "no time" 0 "the ${budget}s budget was spent"
      continue
    fi
    log="$logs/$name.log"
    echo
    echo "== gpu_check [$((SECONDS - t0))s]: $name (limit ${limit}s)"
    start=$SECONDS
    timeout --kill-after=10 "$limit" bash -c "step_${name//-/_}" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    case $rc in
      0) record "$name" ok $((SECONDS - start)) "$(step_detail "$log")" ;;
      77) record "$name" skip $((SECONDS - start)) "$(step_detail "$log")" ;;
      124 | 137) record "$name" timeout $((SECONDS - start)) "killed after ${limit}s: $(step_detail "$log")" ;;
      *) record "$name" FAIL $((SECONDS - start)) "exit $rc: $(step_detail "$log")" ;;
    esac
    if [ "$name" = install ]; then
      safe_path
    fi
  done
}

# The installed fusedres (wheels/ or PYTHON's own) runs, not this checkout: PYTHONSAFEPATH keeps the
# checkout off sys.path here and in every Python the tests start. Without one, the checkout runs.
safe_path() {
  if "$py" -P -c 'import fusedres' 2>/dev/null; then
    export PYTHONSAFEPATH=1
  else
    notes+=("no installed fusedres: the checkout ran (without PYTHONSAFEPATH)")
  fi
}

write_summary() {
  local i bad=0 file=$stage/summary.md
  {
    echo "# scripts/gpu_check.sh $mode_label"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname): budget ${budget}s, ran $((SECONDS - t0))s"
    echo
    grep -E '^(fusedres|python|torch|triton|_C loaded|_C built|_C CUDA|GPU) ' "$stage/fusedres-env.txt" 2>/dev/null |
      sed 's/^/    /'
    echo
    echo "| step | status | seconds | detail |"
    echo "|---|---|---:|---|"
    for i in "${!names[@]}"; do
      echo "| ${names[$i]} | ${statuses[$i]} | ${seconds[$i]} | ${details[$i]} |"
      case ${statuses[$i]} in ok | skip) ;; *) bad=1 ;; esac
    done
    echo
    for i in "${!notes[@]}"; do echo "- ${notes[$i]}"; done
    echo "Files: summary.md, results.json + results.md (the bench steps, merged), overhead.md," \
      "up to $KEEP_PLOTS plots, logs.tar.gz (every log, junit XML, per-step bench files)."
  } >"$file"
  return $bad
}

print_table() {
  local i
  printf '\n%-17s %-8s %7s  %s\n' step status seconds detail
  for i in "${!names[@]}"; do
    printf '%-17s %-8s %7s  %s\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}" "${details[$i]}"
  done
}

main() {
  set -uo pipefail
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
  mode=gpu
  full=0
  only=
  while (($#)); do
    case $1 in
      --dry-run) mode=dry ;;
      --full) mode=full full=1 ;;
      --steps) only=$2 && shift ;;
      --steps=*) only=${1#*=} ;;
      -h | --help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//' && exit 0 ;;
      *) echo "unknown argument $1 (--dry-run, --full, --steps a,b)" >&2 && exit 64 ;;
    esac
    shift
  done
  local step_ known=" ${STEPS[*]%%:*} "
  for step_ in ${only//,/ }; do
    [[ "$known" == *" $step_ "* ]] || { echo "unknown step $step_ (the steps:$known)" >&2 && exit 64; }
  done
  mode_label=$mode
  [ "$mode" = dry ] && mode_label="--dry-run"
  [ "$mode" = full ] && mode_label="--full"
  py=${PYTHON:-python3}
  out=${OUT:-gpu-out}
  wheels=${WHEELS:-wheels}
  case $mode in
    dry) budget=${GPU_CHECK_BUDGET:-300} ;;
    full) budget=${GPU_CHECK_BUDGET:-7200} ;;
    *) budget=${GPU_CHECK_BUDGET:-480} ;;
  esac
  sanitizer=${COMPUTE_SANITIZER:-compute-sanitizer}
  if ! command -v "$sanitizer" >/dev/null && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ]; then
    sanitizer=${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer
  fi
  stage=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
  logs=$stage/logs
  site=$stage/site
  mkdir -p "$logs" "$site"
  # The pip target first on sys.path: the wheels' fusedres and peers over anything installed.
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
  export py mode stage site wheels sanitizer
  export -f pytest_ workers_ bench_ sanitize_ sanitizer_verdict sanitizer_version step_install step_env step_gpu_tests step_cuda_graphs \
    step_triton_launchers step_bench_add_norm step_bench_bn step_overhead step_memcheck step_racecheck
  names=() statuses=() seconds=() details=() notes=()
  t0=$SECONDS
  deadline=$((SECONDS + budget))
  echo "gpu_check $mode_label: python $py, out $out, wheels $wheels, budget ${budget}s, work folder $stage"

  [[ -z "$only" || ",$only," == *",install,"* ]] || safe_path
  run_steps
  if compgen -G "$stage/bench-*/results.json" >/dev/null; then
    merge_bench 2>&1 | tee "$logs/merge-bench.log" || notes+=("merging the bench results failed: see logs/merge-bench.log")
  fi
  local status=0
  write_summary || status=1
  pack_outputs "$stage" "$out"
  print_table
  local limits
  if ! limits=$(check_out_limits "$out"); then
    status=2
  fi
  echo "$limits"
  echo "files in $out: $(cd "$out" && find . -type f | sed 's|^\./||' | sort | tr '\n' ' ')"
  rm -rf "$stage"
  exit $status
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
