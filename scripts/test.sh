#!/usr/bin/env bash
# Every test: formatting, lints, unit and integration tests (qemu-img is
# the judge of every image the tests write).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# The engine's cross-thread protocols under shuttle's scheduler
# (qcow2/tests/alloc_model.rs, and the NBD client's pipelining in
# qcow2/tests/nbd_model.rs; a feature build of its own). Every model
# explores RIMG_MODEL_SCALE times its schedules (default 1; model/).
cargo test -p rimg-qcow2 --features shuttle --test alloc_model --test nbd_model
# rimg-nbd's queue between a connection's reader and its workers.
cargo test -p rimg-nbd --features shuttle --test queue_model
# rimg convert's turn order (img-cli/src/convert/turn.rs).
cargo test -p rimg --features shuttle --bin rimg turn::model
# The vhost inflight region under a kill at any point.
cargo test -p rimg-vhost-server --features shuttle --test inflight_shuttle
