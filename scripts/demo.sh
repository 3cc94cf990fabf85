#!/usr/bin/env bash
# The main job on an embedded default: create a qcow2 image with rimg,
# write through the rimg qcow2 library, show it with rimg info, serve it
# with rimg-vhost-blk to a libblkio vhost-user-blk client for a short
# random-I/O run, and let qemu-img judge the result (check + compare).
# Then boot Linux on rimg-vmm with both daemons (nested KVM).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin rimg --bin rimg-vhost-blk --example demo --example blk_bench \
  -p rimg -p rimg-qcow2 -p rimg-vhost-blk -p rimg-tests
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rimg=target/release/rimg
echo "== rimg create"
"$rimg" create -f qcow2 -o cluster_size=64k "$work/base.qcow2" 256M
"$rimg" create -f qcow2 -b base.qcow2 -F qcow2 "$work/demo.qcow2"
echo "== write through the library"
target/release/examples/demo "$work/demo.qcow2" "$work/reference.raw"
echo "== rimg info --backing-chain"
"$rimg" info --backing-chain "$work/demo.qcow2"
echo "== qemu-img check"
qemu-img check "$work/demo.qcow2"
echo "== qemu-img compare against the raw reference"
qemu-img compare "$work/demo.qcow2" "$work/reference.raw"
echo "== rimg-vhost-blk: serve a copy to a libblkio client (4 KiB random I/O, 2 queues)"
cp "$work/demo.qcow2" "$work/served.qcow2"
mkfifo "$work/log"
target/release/rimg-vhost-blk --socket "$work/blk.sock" --image "$work/served.qcow2" \
  --num-queues 2 2>"$work/log" &
daemon=$!
# The daemon prints its "serving" line once the socket listens.
exec 3<"$work/log"
read -r line <&3
echo "$line"
cat <&3 >&2 &
for rw in write read; do
  printf '%-5s qd 32, 2 queues: ' "$rw"
  target/release/examples/blk_bench virtio-blk-vhost-user "$work/blk.sock" "$rw" 32 2 1
done
kill -TERM "$daemon"
wait "$daemon"
echo "== qemu-img check of the served image"
qemu-img check "$work/served.qcow2"
echo "== the whole stack: Linux on rimg-vmm with rimg-vhost-blk and rimg-vhost-net"
echo "   (nested: this host's KVM cannot boot Linux, so an outer QEMU TCG guest with"
echo "   kvm_amd hosts the daemons and the VMM; the guest kit is fetched on first use)"
cargo run --release --quiet -p rimg-tests --example stack_demo
echo "demo OK"
