#!/usr/bin/env bash
# rimg convert against qemu-img convert, same input, same run. The input
# is the issue's: 1 GiB, about 60 % random data, 10 % half-zero chunks, the
# rest holes. Each case runs RUNS times per tool, alternating, with a sync
# before every run; the median wall time is reported with the ratio
# rimg/qemu-img (lower is better). Outputs are verified with qemu-img
# compare and check.
#
# Usage: benches/convert-bench.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
cargo build --release --quiet --bin rimg
rimg=$PWD/target/release/rimg
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src=$work/src.raw
python3 benches/make-convert-input.py "$src"
qemu-img convert -O qcow2 "$src" "$work/src.qcow2"
cat "$src" "$work/src.qcow2" >/dev/null # warm the page cache

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

timeit() { # out-file tool args... -> seconds
  local out=$1; shift
  rm -f "$out"; sync
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l
}

printf '%-22s %10s %10s %8s\n' case qemu-img_s rimg_s ratio
for case in "raw->qcow2" "qcow2->raw" "raw->qcow2 -c zlib" "raw->qcow2 -c zstd"; do
  case $case in
    "raw->qcow2") in=$src; args=(-O qcow2) ;;
    "qcow2->raw") in=$work/src.qcow2; args=(-O raw) ;;
    "raw->qcow2 -c zlib") in=$src; args=(-c -O qcow2) ;;
    "raw->qcow2 -c zstd") in=$src; args=(-c -O qcow2 -o compression_type=zstd) ;;
  esac
  q=(); r=()
  for _ in $(seq "$runs"); do
    q+=("$(timeit "$work/q.out" qemu-img convert "${args[@]}" "$in" "$work/q.out")")
    r+=("$(timeit "$work/r.out" "$rimg" convert "${args[@]}" "$in" "$work/r.out")")
  done
  qemu-img compare -q "$in" "$work/r.out" || { echo "$case: rimg output differs" >&2; exit 1; }
  if [ "${args[-1]}" != raw ] && [ "${args[1]}" != raw ]; then
    qemu-img check -q "$work/r.out" || { echo "$case: qemu-img check failed" >&2; exit 1; }
  fi
  qm=$(printf '%s\n' "${q[@]}" | median); rm_=$(printf '%s\n' "${r[@]}" | median)
  printf '%-22s %10.3f %10.3f %7.2fx\n' "$case" "$qm" "$rm_" "$(echo "$rm_ / $qm" | bc -l)"
done
