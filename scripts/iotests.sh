#!/usr/bin/env bash
# QEMU's own qemu-iotests as the judge of rimg as qemu-img (or, with
# IOTESTS_MODE=nbd, of rimg-nbd as qemu-nbd).
#
# Usage: scripts/iotests.sh [TEST...]   (default: every selected test)
#
# Obtains the qemu-iotests of the QEMU release the installed qemu-img
# comes from (Debian's source package, through a deb-src entry this
# script adds; cached under target/iotests/, nothing of QEMU's is
# committed), selects the bash tests that run on qcow2 over plain files
# without a VM, NBD, FUSE, TLS or storage daemon (scripts/iotests_select.py),
# and runs each of them with QEMU_IMG_PROG pointing at rimg, through a
# link named qemu-img (rimg installed as qemu-img; qemu-io stays QEMU's).
# A test rimg does not pass is then run again with the installed
# qemu-img, to tell rimg's failures from the environment's: one that
# fails with qemu-img too is the environment's; one that passes with
# qemu-img is rimg's regression. (A test rimg passes is not run with
# qemu-img: the reference output it matches is qemu-img's.)
#
# Prints rimg's pass count, rimg's regressions (with the first line where
# the output differs) and the environment's failures, and writes
#   target/iotests/results/rimg.txt      "<test> <pass|fail|not run|timeout>",
#                                        every test of the run
#   target/iotests/results/qemu-img.txt  the same for qemu-img, only the
#                                        tests rimg did not pass (re-run)
#   target/iotests/run/<prog>/<test>/check.log   what ./check printed
#
# IOTESTS_MODE=nbd judges rimg-nbd instead: the bash tests that run on
# raw images over NBD without a VM (iotests_select.py --nbd), each run as
# `./check -nbd -raw` with QEMU_NBD_PROG pointing at rimg-nbd (qemu-img
# and qemu-io stay QEMU's); a test it does not pass runs again with
# qemu-nbd. Files and summary then say rimg-nbd and qemu-nbd:
# results/rimg-nbd.txt, results/qemu-nbd.txt, run/rimg-nbd/, ...
#
# Environment: RIMG (rimg binary; default: cargo build --bin rimg),
# RIMG_NBD (rimg-nbd binary, nbd mode; default: cargo build),
# IOTESTS_JOBS (parallel tests, default 2: the tests are CPU-bound, two
# keep two cores busy and more are no faster there), IOTESTS_TIMEOUT
# (seconds per test, default 300: a hang is a failure, never a stuck run).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${CARGO_TARGET_DIR:-$ROOT/target}/iotests
JOBS=${IOTESTS_JOBS:-2}
TMO=${IOTESTS_TIMEOUT:-300}

die() { echo "iotests.sh: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

debver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) ||
    die "qemu-utils is not installed (apt-get install qemu-utils)"
# 1:10.0.2+ds-2+deb13u1~bpo12+1 -> 10.0.2
upver=$(sed -e 's/^[0-9]*://' -e 's/[+~-].*//' <<<"$debver")
SRC=$OUT/qemu-$upver/tests/qemu-iotests

# Adds deb-src twins of the machine's Debian sources, with the backports
# suite (where QEMU 10 comes from on bookworm).
add_deb_src() {
    local list=/etc/apt/sources.list.d/rimg-iotests-src.sources cn
    [ -e "$list" ] && return 0
    [ -e /etc/apt/sources.list.d/debian.sources ] ||
        die "no /etc/apt/sources.list.d/debian.sources to derive deb-src from"
    cn=$(. /etc/os-release && echo "$VERSION_CODENAME")
    sed -e 's/^Types: deb$/Types: deb-src/' \
        -e "/^Suites:.* $cn\( \|\$\)/{/ $cn-backports/!s/\$/ $cn-backports/}" \
        /etc/apt/sources.list.d/debian.sources | as_root tee "$list" >/dev/null
}

fetch_iotests() {
    local dl=$OUT/download tarball
    rm -rf "$dl" "$OUT/qemu-$upver.tmp"
    mkdir -p "$dl" "$OUT/qemu-$upver.tmp"
    add_deb_src
    as_root apt-get update -qq >/dev/null
    # The upstream tarball is all that is needed; Debian's own files of a
    # backports version may be gone from the mirror (404): not an error.
    (cd "$dl" && apt-get source --download-only -qq "qemu=$debver" >/dev/null 2>&1) || true
    tarball=$(ls "$dl"/qemu_"$upver"*.orig.tar.* 2>/dev/null | head -1)
    [ -n "$tarball" ] || die "apt-get source qemu=$debver fetched no upstream tarball"
    tar -xf "$tarball" -C "$OUT/qemu-$upver.tmp" "qemu-$upver/tests/qemu-iotests"
    rm -rf "$OUT/qemu-$upver" "$dl"
    mv "$OUT/qemu-$upver.tmp/qemu-$upver" "$OUT/qemu-$upver"
    rmdir "$OUT/qemu-$upver.tmp"
}

mkdir -p "$OUT"
# The two modes may run at once (two cargo tests): one fetches and sets
# up, the other waits for it.
exec 9>"$OUT/.setup.lock"
flock 9
[ -x "$SRC/check" ] || fetch_iotests
[ -x "$SRC/check" ] || die "no $SRC/check after extraction"

# iotests' environment insists on a qemu-system binary even for tests
# that never start one; the selected tests never do.
mkdir -p "$OUT/bin"
if [ ! -x "$OUT/bin/qemu-system-stub" ]; then
    cat >"$OUT/bin/qemu-system-stub.tmp" <<'EOF'
#!/bin/sh
if [ "$1" = "-machine" ] && [ "$2" = "help" ]; then exit 0; fi
echo "qemu-system stub: the iotests harness runs no VM" >&2
exit 1
EOF
    chmod +x "$OUT/bin/qemu-system-stub.tmp"
    mv "$OUT/bin/qemu-system-stub.tmp" "$OUT/bin/qemu-system-stub"
fi
flock -u 9

MODE=${IOTESTS_MODE:-img}
case $MODE in
img) JUDGED=rimg REFERENCE=qemu-img CHECK_ARGS=-qcow2 SELECT_ARGS= ;;
nbd) JUDGED=rimg-nbd REFERENCE=qemu-nbd CHECK_ARGS="-nbd -raw" SELECT_ARGS=--nbd ;;
*) die "IOTESTS_MODE=$MODE: expected img or nbd" ;;
esac
if [ "$MODE" = nbd ]; then
    if [ -z "${RIMG_NBD:-}" ]; then
        (cd "$ROOT" && cargo build --quiet --bin rimg-nbd)
        RIMG_NBD=${CARGO_TARGET_DIR:-$ROOT/target}/debug/rimg-nbd
    fi
    [ -x "$RIMG_NBD" ] || die "no rimg-nbd binary at $RIMG_NBD"
    RIMG=/bin/false
elif [ -z "${RIMG:-}" ]; then
    (cd "$ROOT" && cargo build --quiet --bin rimg)
    RIMG=${CARGO_TARGET_DIR:-$ROOT/target}/debug/rimg
fi
[ -x "$RIMG" ] || die "no rimg binary at $RIMG"
# rimg as a drop-in: installed under qemu-img's name (a link), it names
# itself so in its messages, as qemu-img does from argv[0].
if [ "$MODE" = img ]; then
    mkdir -p "$OUT/bin/rimg-as-qemu-img"
    ln -sfn "$(realpath "$RIMG")" "$OUT/bin/rimg-as-qemu-img/qemu-img"
fi

if [ $# -gt 0 ]; then
    tests=("$@")
else
    # shellcheck disable=SC2086 # SELECT_ARGS is empty or one flag
    mapfile -t tests < <(python3 "$ROOT/scripts/iotests_select.py" $SELECT_ARGS "$SRC")
fi
[ ${#tests[@]} -gt 0 ] || die "no tests selected"

# One test under one qemu-img: its own TEST_DIR, a deadline, and its
# verdict as ./check printed it.
run_one() {
    local prog=$1 t=$2 img nbd tdir sock rc status
    img=$(command -v qemu-img)
    nbd=$(command -v qemu-nbd || echo /bin/false)
    case $prog in
    rimg) img=$OUT/bin/rimg-as-qemu-img/qemu-img ;;
    rimg-nbd) nbd=$RIMG_NBD ;;
    esac
    tdir=$OUT/run/$prog/${t//\//_}
    rm -rf "$tdir"
    mkdir -p "$tdir/scratch"
    sock=$(mktemp -d /tmp/rimg-iotests-sock.XXXXXX)
    rc=0
    # shellcheck disable=SC2086 # CHECK_ARGS is one or two flags
    (cd "$SRC" && env TEST_DIR="$tdir/scratch" SOCK_DIR="$sock" \
        QEMU_PROG="$OUT/bin/qemu-system-stub" QEMU_IMG_PROG="$img" \
        QEMU_IO_PROG="$(command -v qemu-io)" QEMU_NBD_PROG="$nbd" \
        QSD_PROG="$(command -v qemu-storage-daemon || echo /bin/false)" \
        timeout -k 10 "$TMO" ./check $CHECK_ARGS "${t#tests/}") >"$tdir/check.log" 2>&1 || rc=$?
    rm -rf "$sock"
    # ./check rewrites its progress line after a carriage return.
    status=$(tr '\r' '\n' <"$tdir/check.log" |
        sed -n -E "s#^(tests/)?${t#tests/} +(pass|fail|not run) .*#\2#p" | tail -1)
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status=timeout
    fi
    echo "$t ${status:-fail}" >"$tdir/status"
}
# One test with rimg, then with qemu-img if rimg did not pass it: the
# re-run follows in the same slot, so the slots stay busy to the end.
# A qemu-img log of an earlier run is removed, so that run/qemu-img/
# holds only re-runs of this run for the tests it ran.
judge_one() {
    local t=$1
    run_one "$JUDGED" "$t"
    if [ "$(cut -d' ' -f2- "$OUT/run/$JUDGED/${t//\//_}/status")" = pass ]; then
        rm -rf "$OUT/run/$REFERENCE/${t//\//_}"
    else
        run_one "$REFERENCE" "$t"
    fi
}
export -f run_one judge_one
export OUT SRC RIMG RIMG_NBD TMO CHECK_ARGS JUDGED REFERENCE

printf '%s\n' "${tests[@]}" | xargs -P "$JOBS" -n 1 bash -c 'judge_one "$1"' judge_one

mkdir -p "$OUT/results"
for t in "${tests[@]}"; do cat "$OUT/run/$JUDGED/${t//\//_}/status"; done >"$OUT/results/$JUDGED.txt"
for t in "${tests[@]}"; do
    f=$OUT/run/$REFERENCE/${t//\//_}/status
    if [ -e "$f" ]; then cat "$f"; fi
done >"$OUT/results/$REFERENCE.txt"

# The tests of a results file whose status is (is not) the one given.
with() { awk -v s="$2" '{ t = $1; $1 = ""; if (substr($0, 2) == s) print t }' "$OUT/results/$1.txt"; }
without() { awk -v s="$2" '{ t = $1; $1 = ""; if (substr($0, 2) != s) print t }' "$OUT/results/$1.txt"; }
ours=$(with "$JUDGED" pass | wc -l)
reran=$(wc -l <"$OUT/results/$REFERENCE.txt")
regressed=$(with "$REFERENCE" pass | wc -l)
envfail=$(without "$REFERENCE" pass | wc -l)
echo "iotests (QEMU $upver, $CHECK_ARGS, ${#tests[@]} tests): $JUDGED passes $ours;" \
    "of the $reran it does not, $REFERENCE passes $regressed ($JUDGED's) and fails $envfail (the environment's)"
status_of() { awk '{ $1 = ""; print substr($0, 2) }' "$OUT/run/$1/${2//\//_}/status"; }
echo "pass with $REFERENCE, not with $JUDGED:"
for t in $(with "$REFERENCE" pass); do
    log=$OUT/run/$JUDGED/${t//\//_}/check.log
    # The first line of the diff that differs: usually the reason.
    first=$(awk '/^@@/ { d = 1; next } d && /^[-+]/ { print; exit }' "$log" | cut -c1-110)
    printf '  %-28s %-8s %s\n' "$t" "$(status_of "$JUDGED" "$t")" "$first"
done
echo "fail with $REFERENCE too (the environment's):"
for t in $(without "$REFERENCE" pass); do
    printf '  %-28s %-8s %s: %s\n' "$t" "$(status_of "$JUDGED" "$t")" "$REFERENCE" "$(status_of "$REFERENCE" "$t")"
done
