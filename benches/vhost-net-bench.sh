#!/usr/bin/env bash
# rimg-vhost-net against DPDK's own vhost-user-to-TAP bridge (one testpmd
# with net_vhost and net_tap ports, io forwarding), same machine, same run,
# inside a network namespace this script creates and deletes.
#
#   TX (guest -> TAP): testpmd virtio-user txonly -> daemon -> TAP; rate =
#      frames the TAP received (its rx_packets) per second.
#   RX (TAP -> guest): testpmd net_af_packet txonly on the TAP interface ->
#      kernel -> TAP -> daemon -> testpmd virtio-user rxonly; rate = frames
#      the TAP handed to its reader (tx_packets) per second.
# For 64 B and 1500 B frames; prints packets/s, Gbit/s and rimg/DPDK.
#
# Usage: benches/vhost-net-bench.sh [SECONDS_PER_RUN]
set -euo pipefail
SECS=${1:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
command -v dpdk-testpmd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q dpdk-dev >/dev/null
cargo build --release -q -p rimg-vhost-net
RIMG=$ROOT/target/release/rimg-vhost-net
NS=rimg-netbench-$$
W=$(mktemp -d /tmp/rimg-netbench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
nsx() { ip netns exec "$NS" "$@"; }
counter() { nsx cat "/sys/class/net/$1/statistics/$2"; }
EAL=(--no-huge -m 1024 --no-pci --single-file-segments)
# testpmd polls on its second lcore: the client forwards on core 1, the
# DPDK bridge and the RX generator on core 0, so busy pollers do not share
# a core when they need not (rimg's daemon is event-driven).
LCORES=0,1

# testpmd in the background until killed; stdin held open by a FIFO.
pmd() { # prefix args...
  local p=$1; shift
  mkfifo "$W/$p.in"
  sleep 3600 >"$W/$p.in" &
  PIDS+=($!)
  nsx dpdk-testpmd -l "$LCORES" "${EAL[@]}" --file-prefix="$p" "$@" <"$W/$p.in" >"$W/$p.log" 2>&1 &
  PIDS+=($!)
  LAST=$!
}

wait_for_file() { for _ in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done; echo "no $1"; exit 1; }

measure() { # dev counter -> pps over SECS, once frames flow (testpmd
  # without hugepages can take seconds to start), after a 1 s warm-up
  local a0 a b
  a0=$(counter "$1" "$2")
  for _ in $(seq 600); do [ "$(counter "$1" "$2")" -gt $((a0 + 1000)) ] && break; sleep 0.1; done
  sleep 1
  a=$(counter "$1" "$2"); sleep "$SECS"; b=$(counter "$1" "$2")
  echo $(((b - a) / SECS))
}

run_case() { # system dir size -> sets RESULT (pps); no subshell, so
  # the processes it starts stay in PIDS for cleanup
  local sys=$1 dir=$2 size=$3 sock=$W/$1-$2-$3.sock tap dev
  tap=t$RANDOM
  if [ "$sys" = rimg ]; then
    nsx "$RIMG" --socket "$sock" --tap-create "$tap" 2>"$W/rimg.log" &
    PIDS+=($!); local dpid=$!
    wait_for_file "$sock"
  else
    LCORES=1,0 pmd "br$RANDOM" --vdev "net_vhost0,iface=$sock,queues=1" --vdev "net_tap0,iface=$tap" \
      -- --forward-mode=io --total-num-mbufs=8192 -a
    local dpid=$LAST
    wait_for_file "$sock"
    for _ in $(seq 200); do nsx test -e "/sys/class/net/$tap" && break; sleep 0.05; done
    nsx ip link set "$tap" up
  fi
  nsx sysctl -qw "net.ipv6.conf.$tap.disable_ipv6=1"
  local r
  if [ "$dir" = tx ]; then
    pmd "c$RANDOM" --vdev "virtio_user0,path=$sock,queues=1" \
      -- --forward-mode=txonly --txpkts="$size" --total-num-mbufs=8192 -a
    local cpid=$LAST
    r=$(measure "$tap" rx_packets)
  else
    pmd "c$RANDOM" --vdev "virtio_user0,path=$sock,queues=1" \
      -- --forward-mode=rxonly --total-num-mbufs=8192 -a
    local cpid=$LAST
    LCORES=1,0 pmd "g$RANDOM" --vdev "net_af_packet0,iface=$tap" \
      -- --forward-mode=txonly --txpkts="$size" --total-num-mbufs=8192 -a
    local gpid=$LAST
    r=$(measure "$tap" tx_packets)
    kill "$gpid" 2>/dev/null || true; wait "$gpid" 2>/dev/null || true
  fi
  kill "$cpid" 2>/dev/null || true; wait "$cpid" 2>/dev/null || true
  kill "$dpid" 2>/dev/null || true; wait "$dpid" 2>/dev/null || true
  RESULT=$r
}

printf "%-4s %5s | %12s %8s | %12s %8s | %6s\n" dir size "rimg pps" Gbit/s "dpdk pps" Gbit/s ratio
for dir in ${DIRS:-tx rx}; do
  for size in ${SIZES:-64 1500}; do
    run_case rimg "$dir" "$size"; a=$RESULT
    run_case dpdk "$dir" "$size"; b=$RESULT
    printf "%-4s %5s | %12s %8.2f | %12s %8.2f | %6.2f\n" "$dir" "$size" \
      "$a" "$(awk "BEGIN{print $a * $size * 8 / 1e9}")" \
      "$b" "$(awk "BEGIN{print $b * $size * 8 / 1e9}")" \
      "$(awk "BEGIN{print ($b > 0) ? $a / $b : 0}")"
  done
done
