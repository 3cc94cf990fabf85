#!/usr/bin/env bash
# rimg bench against qemu-img bench: same parameters, same kind of fresh
# image, one run. 4 KiB requests at queue depth 32 with a step of one
# cluster (64 KiB), so that every write allocates a new cluster (qemu-img
# bench walks offsets with a fixed step; it has no random mode):
#
#   write-none       -t none (O_DIRECT data I/O)     \ the acceptance rows:
#   write-writeback  -t writeback (page cache)       / rimg >= 1.5x qemu-img
#   read             -t writeback, reading back an image qemu-img wrote
#
# Each mode runs REPS times, the tools interleaved (order alternating from
# one repetition to the next) so that load from other processes on the
# machine hits both alike; the figures are medians. IOPS are given for the
# time each tool reports ("Run completed in") and for the wall time of the
# whole command (open + run + final flush and close); the ratios are
# rimg/qemu-img of the medians.
#
# For reference, the write modes also run qemu-img over QEMU's
# `preallocate` filter (qemu-img+prealloc: driver=preallocate under the
# qcow2 node), which reserves file space ahead of the writes as rimg does
# by default (rimg bench --preallocate-ahead, 128 MiB). Not part of the
# acceptance ratio, which is against plain `qemu-img bench`.
#
# Usage: benches/qcow2-bench.sh [COUNT] [DEPTH] [REPS]
# BENCH_DIR=DIR measures on DIR's file system (default: target/ in the
# working tree, the file system users keep images on; not tmpfs).
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-100000}
depth=${2:-32}
reps=${3:-5}
cargo build --release --quiet --bin rimg
rimg=$PWD/target/release/rimg
work=$(mktemp -d "${BENCH_DIR:-$PWD/target}/rimg-qcow2bench.XXXXXX")
echo "measuring on $(dirname "$work") ($(stat -f -c %T "$work"))"
trap 'rm -rf "$work"' EXIT
img=$work/img.qcow2
args=(-c "$count" -d "$depth" -s 4k -S 64k)

fresh() { # a new, empty 8 GiB qcow2 image at $img
  rm -f "$img"
  qemu-img create -q -f qcow2 -o cluster_size=64k "$img" 8G
  sync
}

run() { # TOOL MODE -> "reported_seconds wall_seconds"
  local tool=$1 mode=$2 cmd out t0 t1 rep
  case $mode in
    write-none) cmd=(bench -w -t none "${args[@]}") ;;
    write-writeback) cmd=(bench -w -t writeback "${args[@]}") ;;
    read) cmd=(bench -t writeback "${args[@]}") ;;
  esac
  case $tool in
    rimg) cmd=("$rimg" "${cmd[@]}" -f qcow2 "$img") ;;
    qemu-img) cmd=(qemu-img "${cmd[@]}" -f qcow2 "$img") ;;
    qemu-img+prealloc) cmd=(qemu-img "${cmd[@]}" --image-opts
      "driver=qcow2,file.driver=preallocate,file.file.driver=file,file.file.filename=$img") ;;
  esac
  t0=$(date +%s.%N)
  out=$("${cmd[@]}")
  t1=$(date +%s.%N)
  rep=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p' <<<"$out")
  [ -n "$rep" ] || { echo "no report from: ${cmd[*]}" >&2; exit 1; }
  echo "$rep $(echo "$t1 - $t0" | bc -l)"
}

median() { # numbers... -> median
  printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {
    if (NR % 2) print v[(NR+1)/2]; else print (v[NR/2] + v[NR/2+1]) / 2 }'
}

declare -A runs walls
modes=(write-none write-writeback read)
for ((r = 0; r < reps; r++)); do
  for mode in "${modes[@]}"; do
    tools=(qemu-img rimg)
    [ "$mode" = read ] || tools+=(qemu-img+prealloc)
    # Alternate the order from one repetition to the next.
    if ((r % 2)); then
      rev=()
      for ((i = ${#tools[@]} - 1; i >= 0; i--)); do rev+=("${tools[i]}"); done
      tools=("${rev[@]}")
    fi
    if [ "$mode" = read ]; then
      # The same input for both: an image qemu-img wrote.
      fresh
      qemu-img bench -w -t writeback "${args[@]}" -f qcow2 "$img" >/dev/null
      sync
    fi
    for tool in "${tools[@]}"; do
      [ "$mode" = read ] || fresh
      res=$(run "$tool" "$mode")
      read -r rep wall <<<"$res"
      sync
      if [ "$mode" != read ]; then
        qemu-img check -q "$img" || { echo "qemu-img check failed on $tool's image" >&2; exit 1; }
      fi
      runs[$mode,$tool]+="$rep "
      walls[$mode,$tool]+="$wall "
      printf '  rep %d %-16s %-17s run %7.3f s  wall %7.3f s\n' $((r + 1)) "$mode" "$tool" "$rep" "$wall" >&2
    done
  done
done
rm -f "$img"

echo
echo "$count requests of 4 KiB, step 64 KiB, depth $depth, fresh 8 GiB qcow2 image (64 KiB clusters); medians of $reps runs"
printf '%-16s %-18s %10s %10s %9s %9s\n' mode tool iops_run iops_wall run_s wall_s
for mode in "${modes[@]}"; do
  tools=(qemu-img rimg)
  [ "$mode" = read ] || tools+=(qemu-img+prealloc)
  declare -A mr mw
  for tool in "${tools[@]}"; do
    # shellcheck disable=SC2086 # word splitting of the recorded list
    mr[$tool]=$(median ${runs[$mode,$tool]})
    # shellcheck disable=SC2086
    mw[$tool]=$(median ${walls[$mode,$tool]})
    printf '%-16s %-18s %10.0f %10.0f %9.3f %9.3f\n' "$mode" "$tool" \
      "$(echo "$count / ${mr[$tool]}" | bc -l)" "$(echo "$count / ${mw[$tool]}" | bc -l)" \
      "${mr[$tool]}" "${mw[$tool]}"
  done
  printf '%-16s ratio rimg/qemu-img: %.2fx (reported run time), %.2fx (wall time)\n' "$mode" \
    "$(echo "${mr[qemu-img]} / ${mr[rimg]}" | bc -l)" "$(echo "${mw[qemu-img]} / ${mw[rimg]}" | bc -l)"
  if [ "$mode" != read ]; then
    printf '%-16s ratio rimg/qemu-img+prealloc: %.2fx (run), %.2fx (wall)\n' "$mode" \
      "$(echo "${mr[qemu-img+prealloc]} / ${mr[rimg]}" | bc -l)" \
      "$(echo "${mw[qemu-img+prealloc]} / ${mw[rimg]}" | bc -l)"
  fi
  unset mr mw
done
