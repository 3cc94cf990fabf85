//! What rimg-vmm shares with its tests: the seccomp filter it installs
//! before the guest runs (the binary is `src/main.rs`).

pub mod seccomp;
