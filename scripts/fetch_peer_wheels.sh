#!/usr/bin/env bash
# Fills wheels/ (git-ignored) with what scripts/gpu_check.sh installs on a GPU machine that has no
# package registry: the fusedres wheel(s) given, and the peer libraries the bench compares with,
# downloaded here for that machine's Python 3.12 on manylinux x86_64, without dependencies (the
# machine's torch and triton must stay). Then it prints each wheel's size and fails when they add
# up to more than fits beside the tree in the device tool's 64 MiB.
#
#   bash scripts/fetch_peer_wheels.sh [FUSEDRES_WHEEL...]     (default: dist/fusedres-*.whl, if any)
#
# The download, for the record (what this runs):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d wheels liger-kernel==0.8.5
#
# Peers (fusedres/bench/peers.py): liger-kernel 0.8.5 (pure Python, 0.9 MB; needs only torch and
# triton). Left out: flash-attn and apex (source builds, no such wheels); quack-kernels 0.6.5
# (0.7 MB, and the bench has no adapter for it) needs nvidia-cutlass-dsl 4.8.1, whose
# nvidia-cutlass-dsl-libs-cu13 wheel alone is 92 MB (with -libs-base 3.1, -libs-core 1.6,
# apache-tvm-ffi 3.3 and torch-c-dlpack-ext 0.9 MB: about 101 MB), over the 64 MiB limit.
#
# Environment: PYTHON (python3, for its pip), WHEELS (wheels), MAX_WHEELS_MB (48: the tree and
# what else travels need the rest).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
dir=${WHEELS:-wheels}
max_mb=${MAX_WHEELS_MB:-48}
PEERS=(liger-kernel==0.8.5)

ours=("$@")
if ((${#ours[@]} == 0)); then
  shopt -s nullglob
  ours=(dist/fusedres-*.whl)
  shopt -u nullglob
fi
((${#ours[@]} <= 1)) || {
  echo "one fusedres wheel at most (pip cannot install two versions): ${ours[*]}" >&2
  exit 1
}
for w in "${ours[@]}"; do
  [ -f "$w" ] || {
    echo "no such wheel: $w" >&2
    exit 1
  }
done

mkdir -p "$dir"
rm -f "$dir"/*.whl # this folder is this script's: a stale wheel would be installed too
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" "${PEERS[@]}"
for w in "${ours[@]}"; do
  cp "$w" "$dir/"
done
((${#ours[@]})) || echo "note: no fusedres wheel given or in dist/: gpu_check.sh will use the fusedres its Python has"

find "$dir" -maxdepth 1 -name '*.whl' -printf '%s %p\n' | sort -k 2 | awk '{printf "%8.1f MB  %s\n", $1 / 1e6, $2}'
total=$(find "$dir" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
echo "$(awk -v t="$total" 'BEGIN {printf "%.1f", t / 1048576}') MiB in $dir/ (limit ${max_mb} MiB)"
if ((total > max_mb * 1024 * 1024)); then
  echo "too large to travel with the tree" >&2
  exit 1
fi
