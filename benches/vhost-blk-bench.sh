#!/usr/bin/env bash
# rimg-vhost-blk against qemu-storage-daemon's vhost-user-blk export, same
# client (libblkio, benches' blk_bench), same images, same run.
# 4 KiB random reads and writes, queue depth 1 and 32, 1 and 2 queues, on
# raw, preallocated qcow2, growing qcow2 and a qcow2 overlay over a raw
# backing file. Prints IOPS, p50/p99 latency and the ratio rimg/qsd, plus
# the ceiling: the client reading and writing the raw file through its
# own io_uring driver.
#
# Usage: benches/vhost-blk-bench.sh [SECONDS_PER_RUN] [IMAGE_SIZE]
# BENCH_DIR=DIR puts the images there (default: target/ in the working
# tree, the file system users keep images on; tmpfs: /dev/shm). FS=xfs
# measures on XFS instead: a file system made on a loop device whose
# backing file is in BENCH_DIR (so on the same disk), mounted for the run
# and removed after (needs root; installs xfsprogs if mkfs.xfs is
# missing; the loop device does direct I/O, so that the raw-direct rows
# reach the disk). CACHE=small (the default), large or none sets the
# page cache each image starts with, the same for both daemons and the
# ceiling (benches/recache.py; not on tmpfs, whose pages it cannot
# drop): small is the 4 KiB folios random 4 KiB I/O leaves; large is
# what the sequential prefill leaves (as readahead or a host-side copy
# would), in which ext4's 4 KiB buffered writes are slow for every
# client, the ceiling with them; none is cold.
set -euo pipefail
SECS=${1:-3}
SIZE=${2:-1G}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release -q -p rimg-vhost-blk -p rimg-tests --bin rimg-vhost-blk --example blk_bench
BENCH=$ROOT/target/release/examples/blk_bench
# RIMG_VHOST_BLK=PATH measures another build of the daemon (A/B runs);
# RIMG_ARGS adds options to it (e.g. RIMG_ARGS="--poll-us 50").
RIMG=${RIMG_VHOST_BLK:-$ROOT/target/release/rimg-vhost-blk}
BASE=${BENCH_DIR:-$ROOT/target}
PIDS=()
LOOP="" MNT="" LOOPFILE=""
# Free page reporting would stall whichever run reuses freed memory.
. "$ROOT/benches/page-reporting.sh"
cleanup() {
  restore_page_reporting
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  # The daemons must be gone before their file system is unmounted.
  wait 2>/dev/null || true
  rm -rf "${W:-}"
  # Lazily: io_uring releases the daemons' files a moment after they exit.
  if [ -n "$MNT" ]; then umount -l "$MNT" 2>/dev/null || true; rmdir "$MNT"; fi
  if [ -n "$LOOP" ]; then losetup -d "$LOOP" 2>/dev/null || true; fi
  if [ -n "$LOOPFILE" ]; then rm -f "$LOOPFILE"; fi
}
trap cleanup EXIT
hold_page_reporting
if [ "${FS:-}" = xfs ]; then
  command -v mkfs.xfs >/dev/null || apt-get install -y -qq xfsprogs >/dev/null
  # Room for the two daemons' images and the ceiling's at once.
  bytes=$(numfmt --from=iec "$SIZE")
  LOOPFILE=$BASE/rimg-blkbench-xfs.img
  truncate -s $((bytes * 4 + (1 << 30))) "$LOOPFILE"
  LOOP=$(losetup -f --show --direct-io=on "$LOOPFILE")
  mkfs.xfs -q -f "$LOOP"
  MNT=$(mktemp -d /tmp/rimg-blkbench-xfs.XXXXXX)
  mount "$LOOP" "$MNT"
  BASE=$MNT
fi
W=$(mktemp -d "$BASE/rimg-blkbench.XXXXXX")
fs=$(stat -f -c %T "$W")
echo "measuring on $(dirname "$W") ($fs), page cache $([ "$fs" = tmpfs ] && echo "tmpfs's own" || echo "${CACHE:-small}")"

make_image() { # kind path
  case $1 in
    raw|raw-direct) qemu-img create -q -f raw "$2" "$SIZE"
         # Fully written so that reads hit the page cache, not holes.
         qemu-io -f raw -c "write -P 0x5a 0 $SIZE" "$2" >/dev/null ;;
    qcow2-prealloc) qemu-img create -q -f qcow2 -o preallocation=metadata "$2" "$SIZE"
         qemu-io -f qcow2 -c "write -P 0x5a 0 $SIZE" "$2" >/dev/null ;;
    qcow2-growing) qemu-img create -q -f qcow2 "$2" "$SIZE" ;;
    # An empty overlay over a written raw base: reads come from the
    # backing file, writes copy the rest of their cluster up first.
    qcow2-backing) qemu-img create -q -f raw "$2.base" "$SIZE"
         qemu-io -f raw -c "write -P 0x5a 0 $SIZE" "$2.base" >/dev/null
         qemu-img create -q -f qcow2 -b "$2.base" -F raw "$2" "$SIZE" ;;
  esac
  # Let the prefill's writeback finish: writes into pages under writeback
  # wait for it, which would measure the disk instead of the daemons.
  sync
  # The same page cache state for both daemons and the ceiling.
  for f in "$2" "$2.base"; do
    if [ -e "$f" ] && [ "$(stat -f -c %T "$f")" != tmpfs ]; then
      python3 "$ROOT/benches/recache.py" "${CACHE:-small}" "$f"
    fi
  done
  sync
}

start_daemon() { # which fmt image sock
  local fmt=$2 rflags="" qflags=""
  if [ "$fmt" = raw-direct ]; then
    # O_DIRECT on both sides: the page cache's per-inode write lock is
    # out of the way, the device underneath is measured.
    rflags=--direct qflags=",cache.direct=on,aio=io_uring"
  fi
  case $fmt in raw*) fmt=raw ;; *) fmt=qcow2 ;; esac
  if [ "$1" = rimg ]; then
    # shellcheck disable=SC2086 # RIMG_ARGS is a list of options
    "$RIMG" --socket "$4" --image "$3" --format "$fmt" --num-queues 2 $rflags ${RIMG_ARGS:-} 2>"$W/daemon.log" &
  else
    qemu-storage-daemon --blockdev driver=file,node-name=f,filename="$3"$qflags \
      --blockdev driver=$fmt,node-name=q,file=f \
      --export type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path="$4",writable=on,num-queues=2 \
      2>"$W/daemon.log" &
  fi
  DPID=$!
  PIDS+=("$DPID")
  for _ in $(seq 200); do [ -S "$4" ] && return 0; sleep 0.05; done
  echo "daemon $1 did not start:"; cat "$W/daemon.log"; exit 1
}

stop_daemon() { kill -TERM "$DPID"; wait "$DPID" || true; }

field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }

printf "%-15s %-5s %2s %2s | %9s %8s %8s | %9s %8s %8s | %6s %6s\n" \
  image rw qd q "rimg IOPS" "p50 us" "p99 us" "qsd IOPS" "p50 us" "p99 us" ratio p99r
for kind in ${KINDS:-raw raw-direct qcow2-prealloc qcow2-growing qcow2-backing}; do
  declare -A R=()
  for d in rimg qsd; do
    img=$W/$d.img
    make_image "$kind" "$img"
    sock=$W/$d.sock
    start_daemon "$d" "$kind" "$img" "$sock"
    for rw in write read; do
      for qd in 1 32; do
        for q in 1 2; do
          R[$d,$rw,$qd,$q]=$("$BENCH" virtio-blk-vhost-user "$sock" "$rw" "$qd" "$q" "$SECS")
        done
      done
    done
    stop_daemon
    if [ "${kind#raw}" = "$kind" ]; then qemu-img check -q "$img" || { echo "qemu-img check failed on $d $kind"; exit 1; }; fi
    rm -f "$img" "$img.base"
  done
  for rw in write read; do
    for qd in 1 32; do
      for q in 1 2; do
        a=${R[rimg,$rw,$qd,$q]}; b=${R[qsd,$rw,$qd,$q]}
        ai=$(echo "$a" | field iops); bi=$(echo "$b" | field iops)
        a5=$(echo "$a" | field p50_us); b5=$(echo "$b" | field p50_us)
        a9=$(echo "$a" | field p99_us); b9=$(echo "$b" | field p99_us)
        printf "%-15s %-5s %2s %2s | %9s %8s %8s | %9s %8s %8s | %6.2f %6.2f\n" \
          "$kind" "$rw" "$qd" "$q" "$ai" "$a5" "$a9" "$bi" "$b5" "$b9" \
          "$(awk "BEGIN{print $ai / $bi}")" "$(awk "BEGIN{print $a9 / $b9}")"
      done
    done
  done
  unset R
done
make_image raw "$W/ceiling.raw"
for rw in read write; do
  for q in 1 2; do
    echo "ceiling: libblkio io_uring on the raw file (page cache), $rw qd 32, $q queue(s): $("$BENCH" io_uring "$W/ceiling.raw" "$rw" 32 "$q" "$SECS")"
  done
done
