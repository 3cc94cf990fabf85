#!/usr/bin/env bash
# rimg-vmm boot time and memory against QEMU's microvm machine, both in the
# nested-KVM setup (outer QEMU TCG guest with kvm_amd; this host's KVM
# cannot boot Linux). ROUNDS=N runs each VMM N times (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --quiet -p rimg-tests --example vmm_boot_bench
