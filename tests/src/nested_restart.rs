//! Issue 20's judge in the nested setup: a Linux guest under rimg-vmm
//! (reconnecting devices) runs a verifying disk load and TCP both ways
//! while the outer "host" SIGKILLs rimg-vhost-blk and rimg-vhost-net
//! in turn, 10 times each, and starts them again. Scripts and the run;
//! the checks are in tests/tests/vmm_restart.rs.

use std::time::Duration;

use crate::nested::{run_nested, StackRun};

/// Load rounds in the inner guest: round i writes 128 KiB of fresh data
/// at its own offset (O_DIRECT), reads it back and compares; at the end
/// every round's data is read and checked again. A kill is cued at the
/// start of every [`KILL_EVERY`]th round (while its I/O is in flight),
/// so the last one lands with rounds to spare.
pub const ROUNDS: u32 = 84;
/// Rounds between two kills.
pub const KILL_EVERY: u32 = 3;
// The last kill lands with rounds to spare (a restart may skip a cue).
const _: () = assert!(ROUNDS > 2 * KILLS * KILL_EVERY + 20);
/// Kills per daemon.
pub const KILLS: u32 = 10;

/// The inner guest: TCP both ways (paced, checksummed on the fly: the
/// streams last as long as the load) while the disk load runs.
const INNER: &str = r#"
echo "inner-cpus $(grep -c ^processor /proc/cpuinfo)"
ip link set eth0 up
ip addr add 10.0.0.2/24 dev eth0
ping -c 1 -W 10 10.0.0.1
dd if=/dev/urandom of=/tmp/out bs=64k count=4 2>/dev/null
( n=0; while [ ! -f /tmp/load-done ]; do cat /tmp/out; n=$((n+1)); usleep 50000; done
  echo $n > /tmp/out-count ) | nc 10.0.0.1 5001 &
SEND=$!
# The receiving side keeps its stdin open (busybox nc half-closes at
# stdin EOF, and the sender would take that for the end).
mkfifo /tmp/hold
exec 3<>/tmp/hold
nc 10.0.0.1 5002 < /tmp/hold | sha256sum > /tmp/in-sum &
RECV=$!
# Each round's data is its slice of one random file (made once: few
# processes per round, which count under nested TCG).
dd if=/dev/urandom of=/tmp/all bs=128k count=@ROUNDS@ 2>/dev/null
i=0
while [ $i -lt @ROUNDS@ ]; do
  # Announced before its I/O: a kill cued by this line lands while the
  # round's requests are in flight (they must be resubmitted).
  echo "load-round $i"
  dd if=/tmp/all of=/dev/vda bs=128k skip=$i seek=$i count=1 oflag=direct conv=notrunc 2>/dev/null
  dd if=/dev/vda of=/tmp/r bs=128k skip=$i count=1 iflag=direct 2>/dev/null
  cmp -n 131072 /tmp/r /tmp/all 0 $((i * 131072))
  i=$((i+1))
done
dd if=/dev/vda of=/tmp/r bs=128k count=$i iflag=direct 2>/dev/null
cmp /tmp/r /tmp/all || { echo "verify-fail"; exit 1; }
echo "inner-verified $i"
touch /tmp/load-done
echo load-done
wait $SEND
n=$(cat /tmp/out-count)
sum=$(i=0; while [ $i -lt $n ]; do cat /tmp/out; i=$((i+1)); done | sha256sum)
echo "inner-out-sum ${sum%% *} ($n copies)"
wait $RECV
echo "inner-in-sum $(cut -d' ' -f1 /tmp/in-sum)"
dmesg | grep -i -E "error|reset|timed out|not a head" || true
echo INNER-PASS
"#;

/// The outer guest ("host"): both daemons under supervisors, a
/// persistent TAP, the kills cued by the inner guest's load rounds.
const OUTER: &str = r#"
ls -l /dev/kvm
ip link set lo up
export RIMG_RUNTIME_DIR=/tmp/rimg-run RUST_LOG=info
step() { echo "outer-step $1 at $(cut -d' ' -f1 /proc/uptime) s"; }
mktap tap0
ip addr add 10.0.0.1/24 dev tap0
ip link set tap0 up
# Each daemon runs under a supervisor that reaps it and starts it again
# until /tmp/stop-NAME exists, as systemd's Restart= would. One that
# cannot start yet (the killed one's io_uring may hold the image lock
# or a TAP queue for a moment) is tried again after a pause.
supervise() {
  name=$1; shift
  while [ ! -f /tmp/stop-$name ]; do
    "$@" >> /tmp/$name.log 2>&1 &
    echo $! > /tmp/$name.pid
    rc=0; wait $! || rc=$?
    echo "$name-exit $rc" >> /tmp/$name.log
    [ $rc = 137 ] || usleep 50000
  done
}
# Whether the daemon NAME's current instance has said it serves.
serving() {
  [ "$(grep -c serving /tmp/$1.log)" -gt "$(grep -c "^$1-exit" /tmp/$1.log)" ]
}
touch /tmp/blk.log /tmp/net.log
supervise blk rimg-vhost-blk --socket /tmp/blk.sock --image /disk.qcow2 &
SUP_BLK=$!
supervise net rimg-vhost-net --socket /tmp/net.sock --tap tap0 --num-queue-pairs 2 &
SUP_NET=$!
until serving blk && serving net; do usleep 20000; done
step daemons-serving
dd if=/dev/urandom of=/tmp/blob bs=64k count=4 2>/dev/null
mkfifo /tmp/hold
exec 3<>/tmp/hold
nc -l -p 5001 < /tmp/hold | sha256sum > /tmp/recv-sum &
RECV=$!
( n=0; while [ ! -f /tmp/stop-send ]; do cat /tmp/blob; n=$((n+1)); usleep 50000; done
  echo $n > /tmp/blob-count ) | nc -l -p 5002 &
SEND=$!
until netstat -ltn | grep -q ':5001 ' && netstat -ltn | grep -q ':5002 '; do usleep 20000; done
step inner-vmm
kb=0; kn=0
# Before the watchdog ends the VMM, the daemons dump their state (with
# the frontend still connected: what they hold when the guest waits).
( sleep $((@WATCHDOG@ - 5)); [ -f /tmp/vmm-done ] ||
  kill -USR1 "$(cat /tmp/blk.pid)" "$(cat /tmp/net.pid)" 2>/dev/null ) &
# The inner console's lines end in CR LF.
cr=$(printf '\r')
( rc=0; timeout -s USR1 -k 5 @WATCHDOG@ rimg-vmm --kernel /vmlinuz --initrd /inner.cpio --memory 256M --cpus 2 \
    --cmdline "console=ttyS0 quiet panic=-1 reboot=k" \
    --disk socket=/tmp/blk.sock,reconnect=30 \
    --net socket=/tmp/net.sock,mac=52:54:00:12:34:56,reconnect=30 2>&1 || rc=$?
  echo "inner-vmm-rc $rc" ) | tee /tmp/inner.log |
  while IFS= read -r l; do
    l=${l%"$cr"}
    # The outer guest's uptime on each line: a stall shows when it began.
    read -r up _ < /proc/uptime
    echo "inner| $up $l"
    case "$l" in
      "load-round 0") step load-start ;;
      "load-round "*)
        [ $((${l#load-round } % @KILL_EVERY@)) = 0 ] || continue
        if [ $kb -le $kn ]; then d=blk; else d=net; fi
        if [ $((kb + kn)) -lt $((2 * @KILLS@)) ] && serving $d; then
          if kill -KILL "$(cat /tmp/$d.pid)" 2>/dev/null; then
            if [ $d = blk ]; then kb=$((kb + 1)); else kn=$((kn + 1)); fi
            echo "outer-kill $d at $(cut -d' ' -f1 /proc/uptime) s"
          fi
        fi ;;
      load-done) touch /tmp/stop-send; step load-done ;;
    esac
  done
rc=$(sed -n 's/^inner-vmm-rc //p' /tmp/inner.log)
echo "vmm-exit ${rc:-none}"
step inner-vmm-done
touch /tmp/vmm-done /tmp/stop-blk /tmp/stop-net /tmp/stop-send
kill -TERM "$(cat /tmp/blk.pid)" "$(cat /tmp/net.pid)" 2>/dev/null || true
wait $SUP_BLK || true
wait $SUP_NET || true
sed 's/^/blk| /' /tmp/blk.log
sed 's/^/net| /' /tmp/net.log
[ "$rc" = 0 ]
wait $RECV
echo "outer-recv-sum $(cut -d' ' -f1 /tmp/recv-sum)"
wait $SEND || true
n=$(cat /tmp/blob-count)
sum=$(i=0; while [ $i -lt $n ]; do cat /tmp/blob; i=$((i+1)); done | sha256sum)
echo "outer-sent-sum ${sum%% *} ($n copies)"
dd if=/disk.qcow2 of=/dev/vda bs=64k conv=fsync 2>/dev/null
echo "disk-size $(stat -c %s /disk.qcow2)"
"#;

/// One run; `timeout` bounds the outer guest, and the inner VMM's
/// watchdog fires 60 s before it, so a hang's dumps come out.
pub fn run_restart_stack(timeout: Duration) -> StackRun {
    let watchdog = timeout.as_secs().saturating_sub(60).max(60);
    let inner = INNER.replace("@ROUNDS@", &ROUNDS.to_string());
    let outer = OUTER
        .replace("@WATCHDOG@", &watchdog.to_string())
        .replace("@KILLS@", &KILLS.to_string())
        .replace("@KILL_EVERY@", &KILL_EVERY.to_string());
    run_nested(&outer, &inner, Vec::new(), timeout)
}
