//! rimg-vhost-blk: a vhost-user-blk backend serving raw and qcow2 images
//! (backing chains included) through the rimg qcow2 engine, with guest
//! data I/O on one io_uring per queue; encrypted images (qcow2 with
//! encryption, LUKS) have their data decrypted by the engine instead.
//!
//! - [`config`]: offered virtio features and the config space.
//! - [`request`]: decoding and validating requests from descriptor chains.
//! - [`worker`]: a queue's request engine and its io_uring.
//! - [`backend`]: the `VhostUserBackend` glue, one thread per queue.
//! - [`server`]: the socket loop (reconnects, signals, shutdown).
//! - [`control`]: the control socket's commands (statistics, resize).

pub mod backend;
pub mod config;
pub mod control;
pub mod request;
pub mod seccomp;
pub mod server;
pub mod worker;
