//! rimg's vhost-user-net backend: a guest's virtio-net queue pairs bridged
//! to a Linux TAP device, frames moving through one io_uring per pair.
//!
//! Modules: [`config`] (features and config space), [`tap`] (the TAP
//! device and its offload ioctls), [`worker`] (one queue pair's data
//! path), [`backend`] (the vhost-user backend), [`server`] (the daemon),
//! [`control`] (the control socket's commands).

pub mod backend;
pub mod config;
pub mod control;
pub mod seccomp;
pub mod server;
pub mod tap;
pub mod worker;
