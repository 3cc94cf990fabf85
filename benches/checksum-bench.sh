#!/usr/bin/env bash
# rimg checksum against what a user does without it: qemu-img convert -O
# raw, then sha256sum of the copy. Same input, same run: the issue's
# 1 GiB mixed input (benches/make-convert-input.py) as raw and as qcow2,
# and a 1 GiB qcow2 holding 1 MiB of data every 16 MiB (zeros input,
# the rest unallocated). Each case runs RUNS times per side, alternating
# which goes first; every run's wall times and the ratio rimg/peer are
# printed (lower is better), then the median and the worst. The ceiling
# is sha256sum alone on the raw copy (the hashing, without the copy).
# Both sides' digests are printed once; they differ by design (rimg's
# is over 64 KiB blocks), and rimg's is checked against the documented
# pipeline on the raw copy.
#
# Usage: benches/checksum-bench.sh [RUNS]
# BENCH_DIR=DIR measures on DIR's file system (default: target/ in the
# working tree, not tmpfs).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release --quiet --bin rimg
rimg=$PWD/target/release/rimg
work=$(mktemp -d "${BENCH_DIR:-$PWD/target}/rimg-checksumbench.XXXXXX")
. benches/page-reporting.sh
hold_page_reporting
restore() {
  restore_page_reporting
  rm -rf "$work"
}
trap restore EXIT
echo "measuring on $(dirname "$work") ($(stat -f -c %T "$work")), $runs runs per case, $(nproc) CPUs"
python3 benches/make-convert-input.py "$work/mixed.raw"
qemu-img convert -O qcow2 "$work/mixed.raw" "$work/mixed.qcow2"
python3 benches/make-convert-input.py "$work/zeros.raw" --zeros
qemu-img convert -O qcow2 "$work/zeros.raw" "$work/zeros.qcow2"
rm -f "$work/zeros.raw"
sync

peer() { # image -> digest
  qemu-img convert -O raw "$1" "$work/copy.raw"
  sha256sum "$work/copy.raw" | cut -c1-64
  rm -f "$work/copy.raw"
}
secs() { # command... -> seconds (bash's clock: no date process per side)
  local t0 t1
  sync
  t0=$EPOCHREALTIME
  "$@" >/dev/null
  t1=$EPOCHREALTIME
  echo "$t1 - $t0" | bc -l
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-14s %4s %10s %10s %8s\n' case run peer_s rimg_s ratio
summary=()
for case in mixed.raw mixed.qcow2 zeros.qcow2; do
  in=$work/$case
  cat "$in" >/dev/null
  # The documented pipeline on QEMU's raw copy gives rimg's value.
  qemu-img convert -O raw "$in" "$work/ref.raw"
  want=$(split -b 64K --filter='sha256sum | head -c 64 | xxd -r -p' "$work/ref.raw" | sha256sum | cut -c1-64)
  ceiling=$(secs sha256sum "$work/ref.raw")
  rm -f "$work/ref.raw"
  got=$("$rimg" checksum "$in" | cut -c1-64)
  [ "$got" = "$want" ] || { echo "$case: rimg checksum $got, pipeline $want" >&2; exit 1; }
  echo "$case: rimg $got, sha256sum of the copy $(peer "$in")"
  ratios=()
  for i in $(seq "$runs"); do
    if [ $((i % 2)) = 1 ]; then
      p=$(secs peer "$in"); r=$(secs "$rimg" checksum "$in")
    else
      r=$(secs "$rimg" checksum "$in"); p=$(secs peer "$in")
    fi
    ratio=$(echo "$r / $p" | bc -l)
    ratios+=("$ratio")
    printf '%-14s %4d %10.3f %10.3f %7.2fx\n' "$case" "$i" "$p" "$r" "$ratio"
  done
  med=$(printf '%s\n' "${ratios[@]}" | median)
  worst=$(printf '%s\n' "${ratios[@]}" | sort -g | tail -1)
  summary+=("$(printf '%-14s median %5.2fx  worst %5.2fx  (sha256sum alone on the copy: %.3f s)' "$case" "$med" "$worst" "$ceiling")")
done
echo
printf '%s\n' "${summary[@]}"
