//! rimg's NBD server (`rimg-nbd`): exports images over the NBD protocol
//! ([`nbd_proto`]) to qemu-img, qemu-io, libnbd's tools, the Linux
//! kernel's client and rimg's own.
//!
//! - [`export`]: what is served, under which names and flags;
//! - [`handshake`]: option haggling until the client picks an export;
//! - [`transmission`]: requests checked and answered on the engine;
//! - [`status`]: block status for the metadata contexts;
//! - [`server`]: listeners, one thread per connection, signals;
//! - [`connection`]: one client from greeting to disconnect, TLS;
//! - [`uring`]: a socket's requests on an io_uring driven by the
//!   connection's thread (the default);
//! - [`concurrent`]: a socket's requests answered by several workers,
//!   fed through a [`queue`] (`--aio threads`);
//! - [`daemon`]: `--fork` and `--pid-file`;
//! - [`tls`]: X.509 credentials as qemu-nbd takes them;
//! - [`seccomp`]: the filter the server runs under;
//! - [`fuzz`]: the fuzzing entry point.

pub mod authz;
pub mod concurrent;
pub mod connection;
pub mod daemon;
mod duplex;
pub mod export;
pub mod fuzz;
pub mod handshake;
pub mod queue;
pub mod seccomp;
pub mod server;
pub mod status;
pub mod tls;
pub mod transmission;
pub mod uring;

pub use export::{Context, Export, Exports};
pub use server::{run, Listen, ServerConfig};
pub use transmission::{Aio, Policy};
