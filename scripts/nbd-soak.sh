#!/usr/bin/env bash
# Soak test for rimg-nbd: rounds of tests/tests/nbd_inflight.rs (QEMU's
# client with 16 requests in flight on the io_uring and threaded data
# paths and over TLS (X.509 and PSK), raw and qcow2, against a model;
# then two clients allocating the same clusters at once, under a
# deadline), each with a random seed,
# until DURATION is over. The server runs as in production: seccomp in
# kill mode, stopped with SIGTERM, its exit status asserted.
#
#   scripts/nbd-soak.sh DURATION      e.g. scripts/nbd-soak.sh 30m
#
# DURATION: seconds, or a number with s, m or h. Prints each round's seed
# and result, then the totals and the replay command of every failing
# round; exits 1 if any failed. Logs of failing rounds are kept in
# $SOAK_DIR (default: a fresh directory under /tmp, printed at the start).
set -euo pipefail

usage() { echo "usage: $0 DURATION   (DURATION: 90, 90s, 30m, 2h)" >&2; exit 2; }
[ $# -eq 1 ] || usage
case "$1" in
  *h) secs=$(( ${1%h} * 3600 ));;
  *m) secs=$(( ${1%m} * 60 ));;
  *s) secs=${1%s};;
  *) secs=$1;;
esac
[[ "$secs" =~ ^[0-9]+$ ]] && [ "$secs" -gt 0 ] || usage

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --quiet --bin rimg-nbd
bin=$(cargo test --no-run -p rimg-tests --test nbd_inflight 2>&1 |
  grep -o '(target/[^)]*nbd_inflight-[0-9a-f]*)' | tr -d '()' | tail -1)
[ -x "$bin" ] || { echo "nbd_inflight test binary not found" >&2; exit 1; }
dir=${SOAK_DIR:-$(mktemp -d /tmp/rimg-nbd-soak.XXXXXX)}
mkdir -p "$dir"
echo "nbd soak: $secs s, logs of failing rounds in $dir"

end=$(( $(date +%s) + secs ))
rounds=0
failing=()
while [ "$(date +%s)" -lt "$end" ]; do
  seed=$(od -An -N6 -tu8 /dev/urandom | tr -d ' ')
  rounds=$((rounds + 1))
  log=$dir/round-$rounds.log
  # The test's own deadlines catch hangs; this one catches the rest.
  if RIMG_SEED=$seed timeout 900 "$bin" --test-threads 1 >"$log" 2>&1; then
    echo "round $rounds seed $seed: ok"
    rm -f "$log"
  else
    echo "round $rounds seed $seed: FAILED (log $log)"
    failing+=("$seed")
  fi
done
echo "rounds: $rounds, failed: ${#failing[@]}"
for s in "${failing[@]}"; do
  echo "replay: RIMG_SEED=$s cargo test -p rimg-tests --test nbd_inflight"
done
if [ ${#failing[@]} -gt 0 ]; then exit 1; fi
# No failing round: no log to keep in the directory made for them.
[ -n "${SOAK_DIR:-}" ] || rmdir "$dir" 2>/dev/null || true
