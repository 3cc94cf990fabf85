#!/usr/bin/env bash
# rimg's qcow2 engine against qemu-img bench, same parameters, same kind
# of image, one run. 4 KiB requests, queue depth 32; the step equals the
# cluster size, so every write allocates a new cluster (qemu-img bench
# walks offsets with a fixed step; it has no random mode). Reads then
# read those clusters back. Prints IOPS and the ratio rimg/qemu-img, for
# the time each tool reports ("Run completed in") and for the wall time
# of the whole command (open + run + final flush/close).
#
# Usage: benches/qcow2-bench.sh [COUNT] [DEPTH]
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-100000}
depth=${2:-32}
cargo build --release --quiet --bin rimg
rimg=$PWD/target/release/rimg
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run() { # tool image args... -> "reported_seconds wall_seconds"
  local tool=$1; shift
  local t0 t1 out
  t0=$(date +%s.%N)
  out=$("$tool" bench "$@")
  t1=$(date +%s.%N)
  local rep
  rep=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p' <<<"$out")
  echo "$rep $(echo "$t1 - $t0" | bc -l)"
}

printf '%-7s %-9s %12s %12s %12s %12s\n' mode tool iops_run iops_wall run_s wall_s
for mode in write read; do
  declare -A rep wall
  for tool in qemu-img rimg; do
    img=$work/$tool.qcow2
    if [ "$mode" = write ]; then
      rm -f "$img"
      qemu-img create -q -f qcow2 -o cluster_size=64k "$img" 8G
      sync
    fi
    flag=()
    [ "$mode" = write ] && flag=(-w)
    bin=$rimg
    [ "$tool" = qemu-img ] && bin=qemu-img
    read -r r w < <(run "$bin" "${flag[@]}" -c "$count" -d "$depth" -s 4k -S 64k -f qcow2 "$img")
    # Let the kernel write back this run's dirty pages before the next.
    sync
    rep[$tool]=$r; wall[$tool]=$w
    printf '%-7s %-9s %12.0f %12.0f %12.3f %12.3f\n' "$mode" "$tool" \
      "$(echo "$count / $r" | bc -l)" "$(echo "$count / $w" | bc -l)" "$r" "$w"
    if [ "$mode" = write ]; then
      qemu-img check -q "$img" || { echo "qemu-img check failed on $tool's image" >&2; exit 1; }
    fi
  done
  printf '%-7s ratio rimg/qemu-img: %.2fx (reported run time), %.2fx (wall time)\n' "$mode" \
    "$(echo "${rep[qemu-img]} / ${rep[rimg]}" | bc -l)" "$(echo "${wall[qemu-img]} / ${wall[rimg]}" | bc -l)"
  unset rep wall
done
