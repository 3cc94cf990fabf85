#!/usr/bin/env bash
# rimg-vhost-net against DPDK's own vhost-user-to-TAP bridge (one testpmd
# with a net_vhost and a net_tap port, io forwarding), same machine, same
# run, same client, same generator, same cores, inside a network namespace
# this script creates and deletes. Nothing leaves that namespace.
#
#   TX (guest -> TAP): testpmd virtio-user txonly -> backend -> TAP.
#      Rate: frames the backend wrote into the TAP (the TAP's rx_packets)
#      per second of wall time.
#   RX (TAP -> guest): net_gen (tests/examples/net_gen.rs) sends frames
#      out through the TAP -> backend -> testpmd virtio-user rxonly.
#      Rate: frames that reached the guest (the client's own RX count,
#      read live through DPDK telemetry) per second. Frames the kernel
#      dropped at a full TAP queue, or the backend read and then dropped,
#      do not count.
# For 64 B and 1500 B frames (Ethernet header to payload end, no FCS;
# Gbit/s = pps * size * 8). Prints the median of REPS runs (rimg and DPDK
# alternate), the spread (min-max), and per run what each side did.
#
# Usage: benches/vhost-net-bench.sh [SECONDS_PER_RUN]
#   env: REPS (3), DIRS ("tx rx"), SIZES ("64 1500"), BENCH_NICE (-15, 0 to
#   leave priorities alone), DPDK_NOSIG=1 (adds a diagnostic DPDK row, see
#   below), KEEP=1 (keep the logs in the work directory).
#
# The setup, and why:
# - Two cores, two roles. CPU 0 is the host: the backend under test, all of
#   its threads (rimg-vhost-net under `taskset -c 0`; the DPDK bridge with
#   `--lcores 0@0,1@0`, main lcore and forwarding lcore both on CPU 0, so
#   its control threads, which follow the main lcore, are there too) and,
#   for RX, the traffic generator, which stands for the host's network
#   stack. CPU 1 is the guest: the testpmd client, main and forwarding
#   lcore (`--lcores 0@1,1@1`). Both backends get the same core; the
#   client gets its own, so it is the same load for both.
#   The previous version of this script gave the bridge `-l 1,0`, which
#   is the set {0,1} with the main lcore 0: the bridge's forwarding lcore
#   ran on CPU 1 together with the client's, two busy pollers sharing one
#   core, and the RX generator (`net_af_packet` testpmd, same mistake) made
#   it three. That is where the 10-20 kpps "DPDK" figures came from.
# - The generator does not share the guest's core: a busy-polling client
#   time-sliced against it makes the result depend on how the backend
#   handles a guest that stops for a scheduler slice (rimg stops reading
#   the TAP and lets it queue; DPDK's io forwarding reads and drops), which
#   cost the DPDK bridge 1.5x (6x with its TAP polled, see DPDK_NOSIG). On
#   CPU 0 both backends share their core with the same generator.
# - Priorities: the machine is shared (builds, fuzzers), and Linux
#   autogroups give each session an equal share whatever its nice value.
#   Every process of the benchmark gets its own session (setsid) with
#   autogroup nice BENCH_NICE, so the measured processes get nearly all of
#   their core; the same for both backends.
# - The DPDK bridge: `--forward-mode=io -a`, default burst (32; 16 and 64
#   measured the same), 8192 mbufs (RX-nombuf stays 0), one queue each.
#   net_tap brings its link up and sets promiscuous mode itself; IPv6 is
#   turned off on both backends' TAPs so that neighbour discovery adds no
#   frames. The tap PMD arms a real-time signal on its TAP file (O_ASYNC,
#   F_SETSIG) and reads the TAP only after that signal fired; the kernel
#   raises it for every frame queued on the TAP, and each one wakes one of
#   the bridge's sleeping control threads. On RX this, not the forwarding
#   loop, is what limits the bridge (strace: one rt_sigreturn per frame
#   read). It is how DPDK's TAP PMD works, so it stays in the main figures.
#   DPDK_NOSIG=1 adds a row "dpdk-nosig": the same bridge with every
#   real-time signal given a handler beforehand (LD_PRELOAD shim, built
#   with cc), which makes the tap PMD fall back to plain polling ("No Rx
#   trigger signal available"): an upper bound for the bridge, not DPDK as
#   shipped.
# - The client: virtio-user (split ring, default queue size 256, mergeable
#   RX buffers on; 1024 entries measured the same), its own 8192 mbufs,
#   `--txpkts=SIZE` for TX. Without hugepages (`--no-huge`, memfd-backed
#   so that the backend can map it). Features are negotiated with each
#   backend (DPDK's vhost also offers IN_ORDER; turning it off in the
#   client changed nothing).
# - Counters are read at two instants around a SECONDS window, after the
#   first frames and one second of warm-up; testpmd's own pps figures are
#   not used (its TSC-derived rates were off by 2x here).
set -euo pipefail
SECS=${1:-5}
REPS=${REPS:-3}
NICE=${BENCH_NICE:--15}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
command -v dpdk-testpmd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q dpdk-dev >/dev/null
cargo build --release -q -p rimg-vhost-net -p rimg-tests --bin rimg-vhost-net --example net_gen
RIMG=$ROOT/target/release/rimg-vhost-net
GEN=$ROOT/target/release/examples/net_gen
NS=rimg-netbench-$$
W=$(mktemp -d /tmp/rimg-netbench.XXXXXX)
PREFIXES=()
AG_OLD=
cleanup() {
  # Only this script's own background jobs that are still running.
  local j
  for j in $(jobs -p); do kill -KILL "$j" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  for p in "${PREFIXES[@]:-}"; do [ -n "$p" ] && rm -rf "/var/run/dpdk/$p"; done
  [ -z "$AG_OLD" ] || echo "$AG_OLD" >/proc/self/autogroup
  if [ -n "${KEEP:-}" ]; then echo "logs in $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
# This script's own session gets the same priority while it runs (its
# helpers read counters at the window's edges), and its old one back after.
if [ "$NICE" != 0 ] && [ -w /proc/self/autogroup ]; then
  AG_OLD=$(awk '{print $3}' /proc/self/autogroup)
  echo "$NICE" >/proc/self/autogroup
fi
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
nsx() { ip netns exec "$NS" "$@"; }
counter() { nsx cat "/sys/class/net/$1/statistics/$2"; }
now() { date +%s.%N; }
die() { echo "$*" >&2; exit 1; }

# Every benchmark process stays open on a FIFO for stdin (testpmd exits
# at end of input).
mkfifo "$W/stdin"
sleep 100000 >"$W/stdin" &

# start CPU LOG CMD...: CMD in the namespace, pinned to CPU, in a session
# of its own at autogroup nice $NICE; sets LAST to its pid (setsid, bash,
# ip netns exec and taskset all exec, so it is CMD's own pid).
start() {
  local cpu=$1 log=$2; shift 2
  setsid bash -c 'n=$1; shift; [ "$n" = 0 ] || { echo "$n" >/proc/self/autogroup 2>/dev/null || true; renice -n "$n" -p $$ >/dev/null; }; exec "$@"' \
    _ "$NICE" ip netns exec "$NS" taskset -c "$cpu" "$@" <"$W/stdin" >"$log" 2>&1 &
  LAST=$!
}

# cpu_snapshot PID...: one line "WALL_NS IDLE0 IDLE1 TOTAL DATA TOTAL DATA
# ...": idle ns of CPUs 0 and 1, and ns on CPU of each PID's threads, all
# of them and its data-path ones (rimg's vring_worker, testpmd's
# rte-worker-N), read in one go.
cpu_snapshot() {
  python3 - "$@" <<'EOF'
import os, sys, time
out = [str(time.clock_gettime_ns(time.CLOCK_MONOTONIC))]
hz = os.sysconf("SC_CLK_TCK")
for line in open("/proc/stat"):
    f = line.split()
    if f[0] in ("cpu0", "cpu1"):
        out.append(str((int(f[4]) + int(f[5])) * 1_000_000_000 // hz))
for pid in sys.argv[1:]:
    tot = data = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            ns = int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
            comm = open(f"/proc/{pid}/task/{t}/comm").read()
        except OSError:
            continue
        tot += ns
        if comm.startswith(("vring_worker", "rte-worker")):
            data += ns
    out += [str(tot), str(data)]
print(" ".join(out))
EOF
}

# DPDK telemetry (the socket of testpmd --file-prefix PREFIX): KEY of
# /ethdev/stats,PORT.
dpdk_stat() { # prefix port key
  python3 - "$@" <<'EOF'
import json, socket, sys
p, port, key = sys.argv[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(5)
s.connect(f"/var/run/dpdk/{p}/dpdk_telemetry.v2")
s.recv(4096)
s.send(f"/ethdev/stats,{port}".encode())
print(json.loads(s.recv(65536))["/ethdev/stats"][key])
EOF
}

# testpmd's final "Forward statistics" for port N, one line.
fwd_stats() { # log port
  awk -v p="Forward statistics for port $2 " '
    index($0, p) {on = 1; next}
    on && /RX-packets/ {rx = $2; rxd = $4}
    on && /TX-packets/ {tx = $2; txd = $4; print "rx " rx " (dropped " rxd "), tx " tx " (dropped " txd ")"; exit}' "$1"
}

wait_until() { # seconds what cmd...: poll until cmd succeeds
  local end=$((SECONDS + $1)) what=$2; shift 2
  until "$@" 2>/dev/null; do
    [ $SECONDS -lt $end ] || die "timed out waiting for $what (logs: $W)"
    sleep 0.05
  done
}

NOSIG=
if [ -n "${DPDK_NOSIG:-}" ]; then
  cat >"$W/nosig.c" <<'EOF'
#include <signal.h>
static void ignore(int s) { (void)s; }
/* Give every real-time signal a handler before DPDK's tap PMD looks for
 * a free one: it then polls the TAP instead of waiting for a signal. */
__attribute__((constructor)) static void take_rt_signals(void) {
    struct sigaction sa = { .sa_handler = ignore };
    sigemptyset(&sa.sa_mask);
    for (int s = SIGRTMIN + 1; s <= SIGRTMAX; s++)
        sigaction(s, &sa, 0);
}
EOF
  cc -O2 -shared -fPIC -o "$W/nosig.so" "$W/nosig.c"
  NOSIG=$W/nosig.so
fi

EAL=(--no-huge -m 256 --no-pci --single-file-segments)
RUN=0
# run_case SYS DIR SIZE: one measurement; sets RESULT (pps) and appends a
# line about what each side did to $W/details.
run_case() {
  local sys=$1 dir=$2 size=$3
  RUN=$((RUN + 1))
  local tag=$sys-$dir-$size-$RUN
  local sock=$W/$tag.sock tap=rb$RUN cpfx=cl$$-$RUN bpfx=br$$-$RUN
  local dpid cpid gpid=
  PREFIXES+=("$cpfx" "$bpfx")
  if [ "$sys" = rimg ]; then
    start 0 "$W/$tag.sys" env RUST_LOG=info "$RIMG" --socket "$sock" --tap-create "$tap"
    dpid=$LAST
    wait_until 30 "rimg-vhost-net's socket" test -S "$sock"
  else
    local pre=()
    [ "$sys" = dpdk-nosig ] && pre=(env "LD_PRELOAD=$NOSIG")
    start 0 "$W/$tag.sys" "${pre[@]}" dpdk-testpmd --lcores 0@0,1@0 "${EAL[@]}" \
      --file-prefix="$bpfx" --vdev "net_vhost0,iface=$sock,queues=1" --vdev "net_tap0,iface=$tap" \
      -- --forward-mode=io --total-num-mbufs=8192 -a
    dpid=$LAST
    wait_until 30 "the bridge's socket" test -S "$sock"
    wait_until 30 "the bridge's TAP" nsx test -e "/sys/class/net/$tap"
  fi
  nsx sysctl -qw "net.ipv6.conf.$tap.disable_ipv6=1"
  local mode=txonly
  [ "$dir" = rx ] && mode=rxonly
  start 1 "$W/$tag.client" stdbuf -oL dpdk-testpmd --lcores 0@1,1@1 "${EAL[@]}" \
    --file-prefix="$cpfx" --vdev "virtio_user0,path=$sock,queues=1" \
    -- --forward-mode=$mode --txpkts="$size" --total-num-mbufs=8192 -a
  cpid=$LAST
  wait_until 60 "the client to start forwarding" grep -q "Press enter" "$W/$tag.client"
  if [ "$dir" = tx ]; then
    get() { counter "$tap" rx_packets; }
  else
    start 0 "$W/$tag.gen" "$GEN" "$tap" "$size"
    gpid=$LAST
    get() { dpdk_stat "$cpfx" 0 ipackets; }
  fi
  flowing() { [ "$(get)" -gt 10000 ]; }
  wait_until 60 "frames to flow" flowing
  sleep 1
  local a t0 b t1 c0 c1 pids=("$dpid" "$cpid")
  [ -n "$gpid" ] && pids+=("$gpid")
  a=$(get); t0=$(now); c0=$(cpu_snapshot "${pids[@]}")
  sleep "$SECS"
  b=$(get); t1=$(now); c1=$(cpu_snapshot "${pids[@]}")
  RESULT=$(awk "BEGIN{printf \"%d\", ($b - $a) / ($t1 - $t0)}")
  # CPU shares (% of one core) over the snapshots' own interval: backend,
  # its data thread, client, generator.
  local idle0 idle1 scpu swcpu ccpu gcpu=0 other0 other1
  read -r idle0 idle1 scpu swcpu ccpu _ gcpu _ < <(echo "$c0 $c1" | awk '{n = NF / 2; dt = $(n + 1) - $1
    for (i = 2; i <= n; i++) printf "%d ", 100 * ($(n + i) - $i) / dt; print ""}')
  other0=$((100 - idle0 - scpu - ${gcpu:-0})); other1=$((100 - idle1 - ccpu))
  [ "$other0" -ge 0 ] || other0=0; [ "$other1" -ge 0 ] || other1=0
  # Stop: generator, then client, then backend; each prints its counts.
  [ -n "$gpid" ] && { kill -INT "$gpid"; wait "$gpid" || true; }
  kill -TERM "$cpid"; wait "$cpid" || true
  local tapc
  tapc="TAP rx $(counter "$tap" rx_packets) tx $(counter "$tap" tx_packets) tx_dropped $(counter "$tap" tx_dropped)"
  if [ "$sys" = rimg ]; then
    kill -TERM "$dpid"; wait "$dpid" || true
  else
    kill -INT "$dpid"; wait "$dpid" || true
  fi
  {
    printf '%-10s %s %5s: %9s pps | cpu0: backend %3s%% (data thread %3s%%)' "$sys" "$dir" "$size" "$RESULT" "$scpu" "$swcpu"
    [ -n "$gpid" ] && printf ', generator %3s%%' "$gcpu"
    printf ', others %s%%, idle %s%% | cpu1: client %3s%%, others %s%%, idle %s%%\n' \
      "$other0" "$idle0" "$ccpu" "$other1" "$idle1"
    printf '    %s\n' "$tapc"
    if [ "$sys" = rimg ]; then
      printf '    rimg: %s\n' "$(grep -o 'pair 0: .*' "$W/$tag.sys" | grep -v ' 0 frames (0 gso, 0 dropped), rx 0 ' | tail -1)"
    else
      printf '    bridge port 0 (vhost): %s\n' "$(fwd_stats "$W/$tag.sys" 0)"
      printf '    bridge port 1 (tap):   %s\n' "$(fwd_stats "$W/$tag.sys" 1)"
      grep -q "No Rx trigger signal" "$W/$tag.sys" && printf '    bridge: tap Rx trigger off (polling)\n'
    fi
    printf '    client: %s\n' "$(fwd_stats "$W/$tag.client" 0)"
    [ -n "$gpid" ] && printf '    generator: %s\n' "$(tail -1 "$W/$tag.gen")"
  } >>"$W/details"
  rm -rf "/var/run/dpdk/$cpfx" "/var/run/dpdk/$bpfx"
}

SYSTEMS=(rimg dpdk)
[ -n "$NOSIG" ] && SYSTEMS+=(dpdk-nosig)
declare -A R
for dir in ${DIRS:-tx rx}; do
  for size in ${SIZES:-64 1500}; do
    for rep in $(seq "$REPS"); do
      for sys in "${SYSTEMS[@]}"; do
        [ "$sys" = dpdk-nosig ] && [ "$dir" = tx ] && continue
        run_case "$sys" "$dir" "$size"
        R[$sys/$dir/$size]+="$RESULT "
      done
    done
  done
done

# median and spread of a list of numbers
stats() { tr ' ' '\n' | grep . | sort -n | awk '{v[NR] = $1} END {m = (NR % 2) ? v[(NR + 1) / 2] : int((v[NR / 2] + v[NR / 2 + 1]) / 2); printf "%d %d %d\n", m, v[1], v[NR]}'; }
gbit() { awk "BEGIN{printf \"%.2f\", $1 * $2 * 8 / 1e9}"; }

echo "rimg-vhost-net vs DPDK vhost-user->TAP bridge: $REPS run(s) of ${SECS}s per case, median pps (min-max)"
printf "%-4s %5s | %9s %-17s %6s | %9s %-17s %6s | %6s\n" dir size "rimg pps" "(min-max)" Gbit/s "dpdk pps" "(min-max)" Gbit/s ratio
for dir in ${DIRS:-tx rx}; do
  for size in ${SIZES:-64 1500}; do
    read -r a amin amax < <(echo "${R[rimg/$dir/$size]}" | stats)
    read -r b bmin bmax < <(echo "${R[dpdk/$dir/$size]}" | stats)
    printf "%-4s %5s | %9s %-17s %6s | %9s %-17s %6s | %6s\n" "$dir" "$size" \
      "$a" "($amin-$amax)" "$(gbit "$a" "$size")" "$b" "($bmin-$bmax)" "$(gbit "$b" "$size")" \
      "$(awk "BEGIN{printf \"%.2f\", ($b > 0) ? $a / $b : 0}")"
    if [ -n "${R[dpdk-nosig/$dir/$size]:-}" ]; then
      read -r c cmin cmax < <(echo "${R[dpdk-nosig/$dir/$size]}" | stats)
      printf "%-4s %5s | %9s %-17s %6s | %9s %-17s %6s | %6s   (dpdk-nosig: tap Rx trigger off)\n" "$dir" "$size" \
        "" "" "" "$c" "($cmin-$cmax)" "$(gbit "$c" "$size")" \
        "$(awk "BEGIN{printf \"%.2f\", ($c > 0) ? $a / $c : 0}")"
    fi
  done
done
echo
echo "Per run (CPU shares are of one core over the measured window):"
cat "$W/details"
