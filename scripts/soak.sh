#!/usr/bin/env bash
# Soak test for rimg-vhost-blk: torture rounds with random seeds and
# random configurations (tests/src/torture, run by the blk_torture example)
# until DURATION is over.
#
#   scripts/soak.sh DURATION [PHASE_MS]     e.g. scripts/soak.sh 30m
#
# DURATION: seconds, or a number with s, m or h. PHASE_MS: load time of
# each phase of a round (default 3000). Prints each round's seed,
# configuration and requests done, then totals (rounds, requests, hangs,
# verification errors, non-zero exits, qemu-img check findings, I/O errors)
# and the replay command of every failing round. Exits 1 if any round
# failed. Full reports of failing rounds are kept in $SOAK_DIR (default: a
# fresh directory under /tmp, printed at the start).
set -euo pipefail

usage() { echo "usage: $0 DURATION [PHASE_MS]   (DURATION: 90, 90s, 30m, 2h)" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
case "$1" in
  *h) secs=$(( ${1%h} * 3600 ));;
  *m) secs=$(( ${1%m} * 60 ));;
  *s) secs=${1%s};;
  *) secs=$1;;
esac
[[ "$secs" =~ ^[0-9]+$ ]] && [ "$secs" -gt 0 ] || usage
phase_ms=${2:-3000}
[[ "$phase_ms" =~ ^[0-9]+$ ]] || usage

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --quiet --release -p rimg-tests --example blk_torture
cargo build --quiet --release -p rimg-vhost-blk --bin rimg-vhost-blk
bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/blk_torture"
dir=${SOAK_DIR:-$(mktemp -d /tmp/rimg-soak.XXXXXX)}
mkdir -p "$dir"
echo "soak: $secs s, phases of $phase_ms ms, reports in $dir"

end=$(( $(date +%s) + secs ))
rounds=0 requests=0 hangs=0 verify=0 exits=0 checks=0 io=0 setup=0 failed=0
failing=()
while [ "$(date +%s)" -lt "$end" ]; do
  seed=$(( (RANDOM << 30) ^ (RANDOM << 15) ^ RANDOM ))
  rounds=$((rounds + 1))
  out="$dir/round-$rounds.txt"
  # A round that overruns its own deadlines by far is killed: the run's
  # limits (per request, exit, client threads) should have ended it.
  set +e
  timeout --kill-after=10 600 "$bin" --seed "$seed" --ms "$phase_ms" >"$out" 2>&1
  rc=$?
  set -e
  line=$(grep -m1 '^seed=' "$out" || true)
  if [ -z "$line" ]; then
    line="seed=$seed config=? requests=0 result=FAIL kinds=crash(rc=$rc)"
  fi
  printf 'round %d: %s\n' "$rounds" "$line"
  n=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$line")
  requests=$(( requests + ${n:-0} ))
  if [ "$rc" -ne 0 ]; then
    failed=$((failed + 1))
    kinds=$(sed -n 's/.* kinds=\([^ ]*\).*/\1/p' <<<"$line")
    [[ "$kinds" == *hang* ]] && hangs=$((hangs + 1))
    [[ "$kinds" == *verify* ]] && verify=$((verify + 1))
    [[ "$kinds" == *exit* ]] && exits=$((exits + 1))
    [[ "$kinds" == *check* ]] && checks=$((checks + 1))
    [[ "$kinds" == *io* ]] && io=$((io + 1))
    [[ "$kinds" == *setup* || "$kinds" == *crash* ]] && setup=$((setup + 1))
    replay=$(grep -m1 '^replay: ' "$out" | sed 's/^replay: //' || true)
    failing+=("seed $seed ($kinds): ${replay:-$bin --seed $seed --ms $phase_ms}  [report: $out]")
  else
    rm -f "$out"
  fi
done

echo
echo "soak totals: rounds=$rounds requests=$requests failed_rounds=$failed"
echo "  hangs=$hangs verification_errors=$verify nonzero_exits=$exits" \
     "qemu_img_check_findings=$checks io_errors=$io setup_or_crash=$setup"
if [ "$failed" -gt 0 ]; then
  echo "failing rounds:"
  for f in "${failing[@]}"; do echo "  $f"; done
  exit 1
fi
# No failing round: no report to keep in the directory made for them.
[ -n "${SOAK_DIR:-}" ] || rmdir "$dir" 2>/dev/null || true
