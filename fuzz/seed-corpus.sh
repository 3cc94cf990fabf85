#!/usr/bin/env bash
# Seeds $FUZZ_WORK/corpus/<target>/ (default fuzz/corpus/, not committed)
# from the reference images in
# fixtures/, the committed regression inputs in fuzz/regressions/, and,
# when qemu-img and qemu-io are installed, a few small images with
# 512-byte clusters: libFuzzer mutates small inputs much faster, and in
# those most bytes are metadata rather than guest data. The vdi, vpc and
# vmdk targets also get the VDI (VHD, VMDK) images of
# fixtures/make-foreign.sh and two 2 MiB (1 MiB) ones.
#
# Usage: fuzz/seed-corpus.sh [TARGET...]   (default: every target)
set -euo pipefail
cd "$(dirname "$0")"
work=${FUZZ_WORK:-.}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(header open_walk read_all check_repair bitmaps vdi vpc vmdk vhdx nbd_server nbd_client)

small=$(mktemp -d)
trap 'rm -rf "$small"' EXIT
if command -v qemu-img >/dev/null && command -v qemu-io >/dev/null; then
  mk() { local name=$1 opts=$2; shift 2
    # Options later in the list win: cluster_size can be overridden.
    qemu-img create -q -f qcow2 -o "cluster_size=512,$opts" "$small/$name.qcow2" 256k
    local a=(); for c in "$@"; do a+=(-c "$c"); done
    [ ${#a[@]} -eq 0 ] || qemu-io -f qcow2 "${a[@]}" "$small/$name.qcow2" >/dev/null
  }
  mk small-v3 compat=1.1 "write -P 0x11 0 2k" "write -P 0x12 100k 700"
  mk small-v2 compat=0.10 "write -P 0x21 0 1k" "write -P 0x22 200k 512"
  mk small-zlib compat=1.1 "write -c -P 0x31 0 512" "write -c -P 0x32 4k 512" "write -P 0x33 8k 512"
  mk small-zstd compat=1.1,compression_type=zstd "write -c -P 0x41 0 512" "write -P 0x42 8k 512"
  mk small-zero compat=1.1 "write -P 0x51 0 4k" "write -z 1k 1k" "write -z -u 2k 1k" "discard 3k 512"
  mk small-rc1 refcount_bits=1 "write -P 0x61 0 2k"
  mk small-rc64 refcount_bits=64 "write -P 0x71 0 2k"
  mk small-lazy lazy_refcounts=on "write -P 0x81 0 2k"
  mk small-snap compat=1.1 "write -P 0x91 0 2k"
  qemu-img snapshot -c s1 "$small/small-snap.qcow2"
  qemu-io -f qcow2 -c "write -P 0x92 512 1k" "$small/small-snap.qcow2" >/dev/null
  # Extended L2 entries need 16 KiB clusters at least.
  mk small-extl2 cluster_size=16k,extended_l2=on "write -P 0xa1 0 1k" "write -P 0xa2 17k 2k" \
    "write -z 40k 1k" "write -c -P 0xa3 64k 16k"
  mk small-bitmaps compat=1.1 "write -P 0xb1 0 1k"
  qemu-img bitmap --add -g 512 "$small/small-bitmaps.qcow2" on
  qemu-img bitmap --add --disable "$small/small-bitmaps.qcow2" off
  qemu-io -f qcow2 -c "write -P 0xb2 100k 1k" "$small/small-bitmaps.qcow2" >/dev/null
  qemu-img create -q -f qcow2 -o cluster_size=512 -b small-v3.qcow2 -F qcow2 \
    "$small/small-backed.qcow2"
  mkdir "$small/vdi"
  ../fixtures/make-foreign.sh "$small/vdi" >/dev/null
  qemu-img create -q -f vdi "$small/vdi/small-dyn.vdi" 2M
  qemu-io -f vdi -c "write -P 0xc1 1M 4k" "$small/vdi/small-dyn.vdi" >/dev/null
  qemu-img create -q -f vdi -o static=on "$small/vdi/small-static.vdi" 2M
  qemu-img create -q -f vpc "$small/vdi/small-dyn.vhd" 1M
  qemu-io -f vpc -c "write -P 0xd1 512k 4k" "$small/vdi/small-dyn.vhd" >/dev/null
  qemu-img create -q -f vpc -o subformat=fixed "$small/vdi/small-fixed.vhd" 1M
  qemu-io -f vpc -c "write -P 0xd2 0 4k" "$small/vdi/small-fixed.vhd" >/dev/null
  qemu-img create -q -f vmdk -o zeroed_grain=on "$small/vdi/small.vmdk" 1M
  qemu-io -f vmdk -c "write -P 0xe1 0 4k" -c "write -z 512k 64k" "$small/vdi/small.vmdk" >/dev/null
  qemu-img create -q -f vmdk "$small/vdi/small-plain.vmdk" 1M
  qemu-io -f vmdk -c "write -P 0xe2 256k 4k" "$small/vdi/small-plain.vmdk" >/dev/null
  # Descriptors: the target reads the file a line names from sector
  # (name length % 64) of the input, so a sparse extent can follow one.
  head='# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
  printf "${head}createType=\"monolithicFlat\"\nRW 64 FLAT \"f\" 0\n\nRW 8 VMFS \"ab\"\n" \
    > "$small/vdi/desc-flat.vmdk"
  printf "${head}createType=\"twoGbMaxExtentSparse\"\nRW 2048 SPARSE \"12345678\"\nRW 8 FLAT \"x\" 2\n" \
    > "$small/vdi/desc-sparse.vmdk"
  truncate -s 4096 "$small/vdi/desc-sparse.vmdk"
  cat "$small/vdi/small-plain.vmdk" >> "$small/vdi/desc-sparse.vmdk"
else
  echo "seed-corpus: qemu-img/qemu-io not found; seeding from fixtures/ only" >&2
fi
# VHDX: compact images (QEMU's own are 8 MiB and more): the header
# section, metadata at 256 KiB, the BAT at 384 KiB, blocks after it. The
# checksums are left 0: the target fills them in.
mkdir -p "$small/vdi"
python3 - "$small/vdi" <<'PY'
import struct, sys, uuid
def g(s): return uuid.UUID(s).bytes_le
def image(size, bs, bat, log_guid=False):
    f = bytearray(0x61000)
    f[0:8] = b"vhdxfile"
    for i, base in enumerate((0x10000, 0x20000)):
        struct.pack_into("<IIQ", f, base, 0x64616568, 0, 10 + i)
        if log_guid:
            f[base + 48:base + 64] = bytes(range(1, 17))
        struct.pack_into("<HHIQ", f, base + 64, 0, 1, 0x100000, 0x100000)
    rt = 0x30000
    struct.pack_into("<IIII", f, rt, 0x69676572, 0, 2, 0)
    f[rt + 16:rt + 32] = g("2dc27766-f623-4200-9d64-115e9bfd4a08")
    struct.pack_into("<QII", f, rt + 32, 0x60000, 0x1000, 1)
    f[rt + 48:rt + 64] = g("8b7ca206-4790-4b9a-b8fe-575f050f886e")
    struct.pack_into("<QII", f, rt + 64, 0x40000, 0x20000, 1)
    md = 0x40000
    f[md:md + 8] = b"metadata"
    struct.pack_into("<HH", f, md + 8, 0, 5)
    items = [("caa16737-fa36-4d43-b3b6-33f0aa44e76b", 0x10000, struct.pack("<II", bs, 0)),
             ("2fa54224-cd1b-4876-b211-5dbed83bf4b8", 0x10008, struct.pack("<Q", size)),
             ("beca12ab-b2e6-4523-93ef-c309e000c746", 0x10010, bytes(range(16))),
             ("8141bf1d-a96f-4709-ba47-f233a8faab5f", 0x10020, struct.pack("<I", 512)),
             ("cda348c7-445d-4471-9cc9-e9885251c556", 0x10024, struct.pack("<I", 4096))]
    for i, (gid, off, val) in enumerate(items):
        e = md + 32 + 32 * i
        f[e:e + 16] = g(gid)
        struct.pack_into("<IIII", f, e + 16, off, len(val), 6 if i else 4, 0)
        f[md + off:md + off + len(val)] = val
    for i, raw in bat:
        struct.pack_into("<Q", f, 0x60000 + 8 * i, raw)
    return f
out = sys.argv[1]
open(out + "/vhdx-states.vhdx", "wb").write(image(5 << 20, 1 << 20, [(0, 2), (1, 4), (2, 7), (3, 0x6)]))
open(out + "/vhdx-zero.vhdx", "wb").write(image(3 << 20, 1 << 20, [(0, 2), (1, 3), (2, 0)]))
open(out + "/vhdx-log.vhdx", "wb").write(image(3 << 20, 1 << 20, [], log_guid=True))
PY

for t in "${targets[@]}"; do
  c=$work/corpus/$t
  mkdir -p "$c"
  if [ "$t" = nbd_server ]; then
    # Client sessions, not images: flags, options, then requests, with
    # compact and with extended headers.
    python3 - "$c" <<'PY'
import struct, sys
def opt(o, d=b""): return struct.pack(">QII", 0x49484156454F5054, o, len(d)) + d
def meta(*qs):
    d = struct.pack(">I", 0) + struct.pack(">I", len(qs))
    for q in qs: d += struct.pack(">I", len(q)) + q
    return d
go = opt(7, struct.pack(">IH", 0, 1) + struct.pack(">H", 3))
def reqs(ext):
    out = b""
    for kind, ln in [(1, 512), (0, 4096), (7, 65536), (6, 4096), (4, 512), (3, 0), (5, 512)]:
        if ext: out += struct.pack(">IHHQQQ", 0x21e41c71, 0, kind, 1, 4096, ln)
        else: out += struct.pack(">IHHQQI", 0x25609513, 0, kind, 1, 4096, ln)
        if kind == 1: out += b"\x11" * ln
    return out + (struct.pack(">IHHQQQ", 0x21e41c71, 0, 2, 0, 0, 0) if ext else struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
q = meta(b"base:allocation", b"qemu:allocation-depth")
d = sys.argv[1]
open(d + "/simple", "wb").write(struct.pack(">I", 3) + go + reqs(False))
open(d + "/structured", "wb").write(struct.pack(">I", 3) + opt(8) + opt(10, q) + go + reqs(False))
open(d + "/extended", "wb").write(struct.pack(">I", 3) + opt(11) + opt(9, meta()) + opt(10, q) + opt(3) + go + reqs(True))
open(d + "/export-name", "wb").write(struct.pack(">I", 3) + opt(1, b"ro") + reqs(False))
PY
    continue
  fi
  if [ "$t" = nbd_client ]; then
    # Server transcripts: greeting, option replies, then replies to the
    # client's requests (cookies 1 on), extended, structured and simple.
    python3 - "$c" <<'PY'
import struct, sys
R = 0x3e889045565a9
def rep(o, t, d=b""): return struct.pack(">QIII", R, o, t, len(d)) + d
ACK, UNSUP = 1, (1 << 31) + 1
hello = struct.pack(">QQH", 0x4e42444d41474943, 0x49484156454F5054, 3)
size, flags = 1 << 20, 0x0fed
info = rep(7, 3, struct.pack(">HQH", 0, size, flags)) + rep(7, 3, struct.pack(">HIII", 3, 1, 4096, 1 << 25)) + rep(7, ACK)
meta = rep(10, 4, struct.pack(">I", 1) + b"base:allocation") + rep(10, ACK)
def ext(cookie, t, payload=b"", off=0):
    return struct.pack(">IHHQQQ", 0x6e8a278c, 1, t, cookie, off, len(payload)) + payload
def sr(cookie, t, payload=b""):
    return struct.pack(">IHHQI", 0x668e33ef, 1, t, cookie, len(payload)) + payload
def simple(cookie): return struct.pack(">IIQ", 0x67446698, 0, cookie)
data = b"\x5a" * 8192
d = sys.argv[1]
# Extended: read, block status, write, zeroes, trim, flush, read.
e = hello + rep(11, ACK) + meta + info
e += ext(1, 1, struct.pack(">Q", 0) + data) + ext(2, 6, struct.pack(">IIQQ", 1, 1, 65536, 0))
e += b"".join(ext(k, 0) for k in (3, 4, 5, 6)) + ext(7, 2, struct.pack(">QI", size - 8192, 8192))
open(d + "/extended", "wb").write(e)
s_ = hello + rep(11, UNSUP) + rep(8, ACK) + meta + info
s_ += sr(1, 1, struct.pack(">Q", 0) + data) + sr(2, 5, struct.pack(">III", 1, 65536, 3))
s_ += b"".join(simple(k) for k in (3, 4, 5, 6)) + sr(7, 0x8001, struct.pack(">IH", 5, 4) + b"oops")
open(d + "/structured", "wb").write(s_)
p = hello + rep(11, UNSUP) + rep(8, UNSUP) + info
p += simple(1) + data + b"".join(simple(k) for k in (2, 3, 4, 5)) + simple(6) + data
open(d + "/simple", "wb").write(p)
PY
    continue
  fi
  cp ../fixtures/*.qcow2 "$c/"
  cp "$small"/*.qcow2 "$c/" 2>/dev/null || true
  [ "$t" != vdi ] || cp "$small"/vdi/*.vdi "$c/" 2>/dev/null || true
  [ "$t" != vpc ] || cp "$small"/vdi/*.vhd "$c/" 2>/dev/null || true
  # Images up to 4 MiB (not the extent files of GiBs, nor QEMU's vhdx).
  for f in "$small"/vdi/*."$t"; do
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -le $((4 << 20)) ] && cp "$f" "$c/"
  done
  if [ -d "regressions/$t" ]; then
    cp regressions/"$t"/* "$c/" 2>/dev/null || true
  fi
  echo "$c: $(ls "$c" | wc -l) inputs"
done
