#!/usr/bin/env bash
# Runs the cargo-fuzz targets with libFuzzer, one after another (a single
# fuzzing process at a time), each for a time or a number of runs.
#
# Usage: fuzz/run.sh [-t SECONDS | -n RUNS] [TARGET...]
#   -t SECONDS  fuzz each target this long (default 600)
#   -n RUNS     or this many executions each
#   TARGET      header, open_walk, read_all, check_repair, bitmaps, vdi, vpc,
#               vmdk, vhdx, nbd_server, nbd_client (default: all)
# Environment: SANITIZER (default none; "address" for ASan),
#   FUZZ_ARGS (extra libFuzzer flags), FUZZ_WORK (where corpus/,
#   artifacts/ and logs/ go; default fuzz/, where git ignores them).
# Crashes are saved in $FUZZ_WORK/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
work=${FUZZ_WORK:-.}

secs=600
runs=""
while getopts "t:n:h" o; do
  case $o in
    t) secs=$OPTARG ;;
    n) runs=$OPTARG ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(header open_walk read_all check_repair bitmaps vdi vpc vmdk vhdx nbd_server nbd_client)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo-fuzz builds with -Z flags (sanitizer, coverage instrumentation);
# RUSTC_BOOTSTRAP lets the stable toolchain accept them, so no nightly is
# needed.
export RUSTC_BOOTSTRAP=1
# The engine is safe Rust: its bugs are panics, overflows, hangs and
# runaway allocations, which need no sanitizer; without one, runs are
# faster. -a keeps debug assertions and overflow checks in the optimized
# build.
san=${SANITIZER:-none}
build=(-a -s "$san")

for t in "${targets[@]}"; do
  [ -d "$work/corpus/$t" ] || ./seed-corpus.sh "$t"
done
cargo fuzz build "${build[@]}"
mkdir -p "$work/logs"

status=0
for t in "${targets[@]}"; do
  if [ -n "$runs" ]; then limit=(-runs="$runs"); else limit=(-max_total_time="$secs"); fi
  # Headers live in the first cluster; the image targets get up to 1 MiB
  # (libFuzzer's own cap when seeds are larger).
  case $t in header) maxlen=65536 ;; *) maxlen=1048576 ;; esac
  extra=()
  [ -d "regressions/$t" ] && extra+=("regressions/$t")
  echo "== $t: ${limit[*]}"
  mkdir -p "$work/artifacts/$t"
  log=$work/logs/$t.log
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
  cargo fuzz run "${build[@]}" "$t" "$work/corpus/$t" "${extra[@]}" -- \
    -rss_limit_mb=512 -timeout=10 -max_len="$maxlen" -print_final_stats=1 \
    -artifact_prefix="$work/artifacts/$t/" "${limit[@]}" ${FUZZ_ARGS:-} \
    2>&1 | tee "$log" || status=1
  echo "== $t: corpus $(ls "$work/corpus/$t" | wc -l) inputs;" \
    "$(grep -E 'stat::number_of_executed_units' "$log" | tail -1)"
done
exit $status
