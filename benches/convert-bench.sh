#!/usr/bin/env bash
# rimg convert against qemu-img convert, same input, same run. Inputs:
# "mixed", the issue's 1 GiB (about 60 % random data, 10 % half-zero
# chunks, the rest holes), and "zeros", 1 GiB of written (allocated)
# zeros with 1 MiB of data every 16 MiB. Each case runs RUNS times per
# tool, alternating which goes first, with a sync before every run; every
# run's wall times and ratio rimg/qemu-img are printed (lower is better),
# then the median and the worst ratio: the target is the worst one. Each
# case's runs follow warm-up pairs, not counted (see there).
# Outputs are verified with qemu-img compare and check.
#
# Usage: benches/convert-bench.sh [RUNS]
# BENCH_DIR=DIR measures on DIR's file system (default: target/ in the
# working tree, the file system users keep images on; not tmpfs).
# CASES="..." picks cases by name (default: every uncompressed case of
# raw and qcow2). Names are INPUT:SRC->DST with SRC and DST among raw,
# qcow2, vdi, vpc, vmdk, vmdks (streamOptimized) and vhdx,
# or raw->qcow2-zlib / raw->qcow2-zstd; FOREIGN=1 adds every foreign
# format to qcow2 and back on the mixed input (issue 21's table).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
cargo build --release --quiet --bin rimg
rimg=$PWD/target/release/rimg
work=$(mktemp -d "${BENCH_DIR:-$PWD/target}/rimg-convertbench.XXXXXX")
# Free page reporting would stall whichever run reuses freed memory.
. benches/page-reporting.sh
hold_page_reporting
restore() {
  restore_page_reporting
  rm -rf "$work"
}
trap restore EXIT
echo "measuring on $(dirname "$work") ($(stat -f -c %T "$work")), $runs runs per case"
# qemu-img's output options for a format name.
out_args() {
  case $1 in
    vmdks) echo "-O vmdk -o subformat=streamOptimized" ;;
    *) echo "-O $1" ;;
  esac
}
foreign="vdi vpc vmdk vmdks vhdx"
for input in mixed zeros; do
  flag=""; [ $input = zeros ] && flag=--zeros
  python3 benches/make-convert-input.py "$work/$input.raw" $flag
  qemu-img convert -O qcow2 "$work/$input.raw" "$work/$input.qcow2"
done
if [ "${FOREIGN:-0}" = 1 ]; then
  for f in $foreign; do
    # shellcheck disable=SC2046 # out_args is a word list
    qemu-img convert $(out_args $f) "$work/mixed.raw" "$work/mixed.$f"
  done
fi
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
if [ "${FOREIGN:-0}" = 1 ]; then
  all=""
  for f in $foreign; do
    all+=" mixed:$f->qcow2"
    all+=" mixed:qcow2->$f"
  done
fi
printf '%-24s %4s %10s %10s %8s\n' case run qemu-img_s rimg_s ratio
summary=()
for case in ${CASES:-$all}; do
  input=${case%%:*}; conv=${case#*:}
  case $conv in
    "raw->qcow2-zlib") in=$work/$input.raw; args=(-c -O qcow2) ;;
    "raw->qcow2-zstd") in=$work/$input.raw; args=(-c -O qcow2 -o compression_type=zstd) ;;
    *)
      src=${conv%%->*}; dst=${conv#*->}
      in=$work/$input.$src
      read -r -a args <<< "$(out_args "$dst")"
      ;;
  esac
  # Warm the input's pages: both tools read it from the cache. Then
  # warm-up pairs (not counted) until each tool's time is within 25 % of
  # its previous warm-up (at most 6 pairs).
  cat "$in" >/dev/null
  pq=0; pr=0; warm=0
  while [ $warm -lt 6 ]; do
    wq=$(timeit "$work/q.out" qemu-img convert "${args[@]}" "$in" "$work/q.out")
    wr=$(timeit "$work/r.out" "$rimg" convert "${args[@]}" "$in" "$work/r.out")
    warm=$((warm + 1))
    steady=$(echo "$wq <= $pq * 1.25 && $pq <= $wq * 1.25 && $wr <= $pr * 1.25 && $pr <= $wr * 1.25" | bc -l)
    [ "$steady" = 1 ] && break
    pq=$wq; pr=$wr
  done
  printf '%-24s warm-up: %d pairs\n' "$case" "$warm"
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
  # (A VHD's size is rounded up to its geometry: compare warns, and
  # reads the rest as zeros.)
  qemu-img compare -q "$in" "$work/r.out" 2>/dev/null || { echo "$case: rimg output differs" >&2; exit 1; }
  # qemu-img has no check for raw and vpc.
  case ${args[1]} in raw|vpc) ;; *)
    qemu-img check -q "$work/r.out" || { echo "$case: qemu-img check failed" >&2; exit 1; }
  esac
  med=$(printf '%s\n' "${ratios[@]}" | median)
  worst=$(printf '%s\n' "${ratios[@]}" | sort -g | tail -1)
  summary+=("$(printf '%-24s median %5.2fx  worst %5.2fx' "$case" "$med" "$worst")")
done
echo
printf '%s\n' "${summary[@]}"
