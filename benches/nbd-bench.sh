#!/usr/bin/env bash
# rimg-nbd against qemu-nbd serving the same qcow2 image, same client
# (fio's nbd engine, libnbd), same run: 4 KiB random reads and writes at
# queue depth 32 and 1 MiB sequential reads and writes, on one connection.
# Prints IOPS or MiB/s, the ratio rimg/qemu, and the ceiling: fio's
# io_uring engine on the image's raw twin, no NBD in between.
#
# The image is fully written first (random reads hit data, writes
# overwrite allocated clusters). Both servers open it with their default
# caching (the host page cache) and the same --discard.
#
# Usage: benches/nbd-bench.sh [SECONDS_PER_RUN] [IMAGE_SIZE]
# BENCH_DIR=DIR puts the images there (default: target/ in the working
# tree, the file system users keep images on). RIMG_NBD_ARGS adds options
# to rimg-nbd's (`--aio threads` compares its two data paths).
set -euo pipefail
SECS=${1:-5}
SIZE=${2:-1G}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
command -v fio >/dev/null || apt-get install -y -qq fio >/dev/null
fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd' || {
  echo "this fio has no nbd engine" >&2
  exit 1
}
cargo build --release -q -p rimg-nbd
RIMG=${RIMG_NBD:-$ROOT/target/release/rimg-nbd}
BASE=${BENCH_DIR:-$ROOT/target}
SERVER=""
. "$ROOT/benches/page-reporting.sh"
cleanup() {
  restore_page_reporting
  stop_server
  rm -rf "${W:-}"
}
stop_server() {
  if [ -n "$SERVER" ]; then
    kill "$SERVER" 2>/dev/null || true
    while kill -0 "$SERVER" 2>/dev/null; do sleep 0.05; done
    SERVER=""
  fi
}
trap cleanup EXIT
hold_page_reporting
W=$(mktemp -d "$BASE/rimg-nbdbench.XXXXXX")
echo "measuring on $(dirname "$W") ($(stat -f -c %T "$W")), ${SECS}s per run, $SIZE image"
IMG=$W/disk.qcow2
RAW=$W/disk.raw
qemu-img create -q -f qcow2 "$IMG" "$SIZE"
qemu-io -f qcow2 -c "write -P 0x5a 0 $SIZE" "$IMG" >/dev/null
# The twin is written the same way.
qemu-img create -q -f raw "$RAW" "$SIZE"
qemu-io -f raw -c "write -P 0x5a 0 $SIZE" "$RAW" >/dev/null
SOCK=$W/nbd.sock

start_rimg() {
  # shellcheck disable=SC2086 # options, split on purpose
  RUST_LOG=info "$RIMG" ${RIMG_NBD_ARGS:-} -t -e 0 -k "$SOCK" -f qcow2 "$IMG" 2>"$W/rimg.log" &
  SERVER=$!
  while ! grep -q serving "$W/rimg.log"; do
    kill -0 "$SERVER" || { cat "$W/rimg.log"; exit 1; }
    sleep 0.05
  done
}
start_qemu() {
  qemu-nbd -t -e 0 -k "$SOCK" -f qcow2 "$IMG" 2>"$W/qemu.log" &
  SERVER=$!
  while [ ! -S "$SOCK" ]; do
    kill -0 "$SERVER" || { cat "$W/qemu.log"; exit 1; }
    sleep 0.05
  done
}

# fio_run ENGINE-ARGS RW BS DEPTH -> IOPS (4k) or MiB/s (1M)
fio_run() {
  local rw=$1 bs=$2 depth=$3; shift 3
  local out
  out=$(fio --name=b --rw="$rw" --bs="$bs" --iodepth="$depth" --size="$SIZE" \
    --time_based --runtime="$SECS" --ramp_time=1 --output-format=json \
    --randrepeat=0 "$@")
  python3 -c '
import json, sys
# The nbd engine prints a line of its own before the JSON.
text = sys.stdin.read()
j = json.loads(text[text.index("{"):])["jobs"][0]
side = "read" if j["read"]["io_bytes"] > 0 else "write"
r = j[side]
print(round(r["iops"]) if sys.argv[1] == "iops" else round(r["bw"] / 1024))
' "$([ "$bs" = 4k ] && echo iops || echo mib)" <<<"$out"
}

# Each server (and the ceiling) starts from a cold page cache, writes
# first: a 4 KiB buffered write into a large folio (the kind a big write
# or readahead leaves in the cache) costs ext4 a walk over every block of
# the folio, measured here at a tenth of the rate into small folios, for
# both servers alike. Cold, the random writes fill the cache in small
# folios and the reads that follow hit it.
drop_caches() {
  sync
  if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; fi
}
CASES=("randwrite 4k 32" "randread 4k 32" "write 1M 4" "read 1M 4")
declare -A R Q C
for srv in rimg qemu; do
  drop_caches
  "start_$srv"
  for c in "${CASES[@]}"; do
    set -- $c
    v=$(fio_run "$1" "$2" "$3" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK")
    if [ $srv = rimg ]; then R[$c]=$v; else Q[$c]=$v; fi
  done
  stop_server
  qemu-img check -q "$IMG"
done
drop_caches
for c in "${CASES[@]}"; do
  set -- $c
  C[$c]=$(fio_run "$1" "$2" "$3" --ioengine=io_uring --filename="$RAW")
done
printf '%-16s %10s %10s %7s %10s\n' case rimg-nbd qemu-nbd ratio ceiling
for c in "${CASES[@]}"; do
  set -- $c
  unit=$([ "$2" = 4k ] && echo IOPS || echo MiB/s)
  printf '%-16s %10s %10s %6.2fx %10s  %s\n' "$1 $2 QD$3" "${R[$c]}" "${Q[$c]}" \
    "$(echo "${R[$c]} / ${Q[$c]}" | bc -l)" "${C[$c]}" "$unit"
done
