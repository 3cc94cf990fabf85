#!/usr/bin/env bash
# rimg convert against qemu-img convert, same input, same run. Inputs:
# "mixed", the issue's 1 GiB (about 60 % random data, 10 % half-zero
# chunks, the rest holes), and "zeros", 1 GiB of written (allocated)
# zeros with 1 MiB of data every 16 MiB. Each case runs RUNS times per
# tool, alternating which goes first, with a sync before every run; every
# run's wall times and ratio rimg/qemu-img are printed (lower is better),
# then the median and the worst ratio: the target is the worst one.
# Outputs are verified with qemu-img compare and check.
#
# Usage: benches/convert-bench.sh [RUNS]
# BENCH_DIR=DIR measures on DIR's file system (default: target/ in the
# working tree, the file system users keep images on; not tmpfs).
# CASES="..." picks cases by name (default: every uncompressed case).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
cargo build --release --quiet --bin rimg
rimg=$PWD/target/release/rimg
work=$(mktemp -d "${BENCH_DIR:-$PWD/target}/rimg-convertbench.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "measuring on $(dirname "$work") ($(stat -f -c %T "$work")), $runs runs per case"
for input in mixed zeros; do
  flag=""; [ $input = zeros ] && flag=--zeros
  python3 benches/make-convert-input.py "$work/$input.raw" $flag
  qemu-img convert -O qcow2 "$work/$input.raw" "$work/$input.qcow2"
done
sync

# The clock is bash's own ($EPOCHREALTIME): a `date` process on each side
# would add its start-up to both tools' times, a large part of a job
# that takes tens of milliseconds.
timeit() { # out-file tool args... -> seconds
  local out=$1; shift
  rm -f "$out"; sync
  local t0 t1
  t0=$EPOCHREALTIME
  "$@" >/dev/null
  t1=$EPOCHREALTIME
  echo "$t1 - $t0" | bc -l
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

all="mixed:raw->qcow2 mixed:qcow2->raw zeros:raw->qcow2 zeros:qcow2->raw"
printf '%-24s %4s %10s %10s %8s\n' case run qemu-img_s rimg_s ratio
summary=()
for case in ${CASES:-$all}; do
  input=${case%%:*}; conv=${case#*:}
  case $conv in
    "raw->qcow2") in=$work/$input.raw; args=(-O qcow2) ;;
    "qcow2->raw") in=$work/$input.qcow2; args=(-O raw) ;;
    "raw->qcow2-zlib") in=$work/$input.raw; args=(-c -O qcow2) ;;
    "raw->qcow2-zstd") in=$work/$input.raw; args=(-c -O qcow2 -o compression_type=zstd) ;;
  esac
  # Warm the input's pages: both tools read it from the cache.
  cat "$in" >/dev/null
  ratios=()
  for i in $(seq "$runs"); do
    if [ $((i % 2)) = 1 ]; then
      q=$(timeit "$work/q.out" qemu-img convert "${args[@]}" "$in" "$work/q.out")
      r=$(timeit "$work/r.out" "$rimg" convert "${args[@]}" "$in" "$work/r.out")
    else
      r=$(timeit "$work/r.out" "$rimg" convert "${args[@]}" "$in" "$work/r.out")
      q=$(timeit "$work/q.out" qemu-img convert "${args[@]}" "$in" "$work/q.out")
    fi
    ratio=$(echo "$r / $q" | bc -l)
    ratios+=("$ratio")
    printf '%-24s %4d %10.3f %10.3f %7.2fx\n' "$case" "$i" "$q" "$r" "$ratio"
  done
  qemu-img compare -q "$in" "$work/r.out" || { echo "$case: rimg output differs" >&2; exit 1; }
  if [ "${args[-1]}" != raw ]; then
    qemu-img check -q "$work/r.out" || { echo "$case: qemu-img check failed" >&2; exit 1; }
  fi
  med=$(printf '%s\n' "${ratios[@]}" | median)
  worst=$(printf '%s\n' "${ratios[@]}" | sort -g | tail -1)
  summary+=("$(printf '%-24s median %5.2fx  worst %5.2fx' "$case" "$med" "$worst")")
done
echo
printf '%s\n' "${summary[@]}"
