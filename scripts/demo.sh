#!/usr/bin/env bash
# The main job on an embedded default: create a qcow2 image with rimg,
# write through the rimg qcow2 library, show it with rimg info, and let
# qemu-img judge it (check + compare against a raw reference).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin rimg --example demo -p rimg -p rimg-qcow2
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
echo "demo OK"
