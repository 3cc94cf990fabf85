#!/usr/bin/env bash
# Extended L2 entries (subclusters) against plain L2 entries, rimg bench
# against qemu-img bench on the same images: 4 KiB writes into fresh
# 64 KiB clusters of an overlay whose backing file holds data everywhere.
# Without subclusters every write copies the rest of its cluster from the
# backing file (60 KiB read and written per 4 KiB); with them, a 4 KiB
# write covers two whole 2 KiB subclusters and copies nothing. qemu-img
# bench has no random mode: it walks offsets with a fixed step, here one
# cluster, so every write lands in a cluster of its own, as random 4 KiB
# writes into a large disk do.
#
# Each case runs REPS times on a fresh overlay, the tools interleaved
# (order alternating) so that other load hits both alike; figures are
# medians of the time each tool reports ("Run completed in"). After each
# run `qemu-img check` must be clean and the overlay must read the same
# as one qemu-img wrote (`qemu-img compare`). The images live in the
# working tree's file system (ext4 here), under target/.
#
# Usage: benches/subcluster-bench.sh [COUNT] [DEPTH] [REPS] [CACHE]
#   COUNT requests (default 4096: a 256 MiB stretch), DEPTH (32), REPS (5),
#   CACHE none|writeback (none: O_DIRECT, as a VM with cache=none).
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-4096}
depth=${2:-32}
reps=${3:-5}
cache=${4:-none}
cargo build --release --quiet --bin rimg
rimg=$PWD/target/release/rimg
mkdir -p target
work=$(mktemp -d "$PWD/target/subcluster-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
span=$((count * 64 * 1024))
base=$work/base.qcow2
top=$work/top.qcow2
ref=$work/ref.qcow2
args=(-w -t "$cache" -c "$count" -d "$depth" -s 4k -S 64k)

qemu-img create -q -f qcow2 "$base" "$span"
qemu-io -f qcow2 -c "write -P 0x5a 0 $span" "$base" >/dev/null

overlay() { # EXTL2 PATH: a fresh overlay on the base
  rm -f "$2"
  qemu-img create -q -f qcow2 -o "cluster_size=64k,extended_l2=$1" \
    -b base.qcow2 -F qcow2 "$2"
}

median() { # numbers... -> median
  printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {
    if (NR % 2) print v[(NR+1)/2]; else print (v[NR/2] + v[NR/2+1]) / 2 }'
}

declare -A runs
for ((r = 0; r < reps; r++)); do
  for ext in off on; do
    overlay "$ext" "$ref"
    qemu-img bench "${args[@]}" -f qcow2 "$ref" >/dev/null
    tools=(qemu-img rimg)
    ((r % 2)) && tools=(rimg qemu-img)
    for tool in "${tools[@]}"; do
      overlay "$ext" "$top"
      sync
      case $tool in
        rimg) out=$("$rimg" bench "${args[@]}" -f qcow2 "$top") ;;
        qemu-img) out=$(qemu-img bench "${args[@]}" -f qcow2 "$top") ;;
      esac
      t=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p' <<<"$out")
      [ -n "$t" ] || { echo "no report from $tool: $out" >&2; exit 1; }
      qemu-img check -q "$top" || { echo "qemu-img check failed on $tool's image" >&2; exit 1; }
      qemu-img compare -q "$top" "$ref" ||
        { echo "$tool's overlay (extended_l2=$ext) reads differently" >&2; exit 1; }
      runs[$ext,$tool]+="$t "
      printf '  rep %d extended_l2=%-3s %-8s %7.3f s\n' $((r + 1)) "$ext" "$tool" "$t" >&2
    done
  done
done

echo
echo "$count writes of 4 KiB into fresh 64 KiB clusters over a backing file," \
  "depth $depth, cache=$cache; medians of $reps runs"
printf '%-14s %-9s %10s %9s\n' extended_l2 tool iops run_s
declare -A med
for ext in off on; do
  for tool in qemu-img rimg; do
    # shellcheck disable=SC2086 # word splitting of the recorded list
    med[$ext,$tool]=$(median ${runs[$ext,$tool]})
    printf '%-14s %-9s %10.0f %9.3f\n' "$ext" "$tool" \
      "$(echo "$count / ${med[$ext,$tool]}" | bc -l)" "${med[$ext,$tool]}"
  done
  printf '%-14s ratio rimg/qemu-img: %.2fx\n' "$ext" \
    "$(echo "${med[$ext,qemu-img]} / ${med[$ext,rimg]}" | bc -l)"
done
for tool in qemu-img rimg; do
  printf 'subclusters on/off, %-8s %.2fx\n' "$tool:" \
    "$(echo "${med[off,$tool]} / ${med[on,$tool]}" | bc -l)"
done
