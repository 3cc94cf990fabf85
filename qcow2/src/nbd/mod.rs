//! Images on NBD servers: an address ([`uri`]) names an export, and a
//! [`client::Client`] under a [`crate::storage::Storage`] serves the
//! engine's I/O to it, so that raw and qcow2 images (and backing files)
//! can live on another host as QEMU's nbd protocol driver allows.

pub mod client;
#[cfg(feature = "fuzz-targets")]
pub mod fuzz;
pub mod socket;
pub mod tls;
pub mod uri;

pub use client::Client;
pub use socket::Socket;
pub use uri::{display_name, is_nbd, parse, Address};
