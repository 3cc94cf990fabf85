//! The NBD protocol's wire format, with no I/O: the constants, and
//! encoders and bounded decoders for the handshake's options and replies
//! and the transmission phase's requests and replies. rimg's server
//! (`rimg-nbd`) and the engine's client share it.
//!
//! The reference is NetworkBlockDevice/nbd's doc/proto.md, with its
//! extended-headers extension (branch `extension-ext-header`, which
//! QEMU 8.2 and later speak). Section names below are that document's.
//! All integers are big-endian ("network byte order", §Conventions).

pub mod consts;
pub mod option;
pub mod reply;
pub mod request;
mod wire;

pub use wire::{Cursor, WireError};

/// The largest payload a request or reply carries unless the peers
/// agreed on another (§Size constraints: 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// The longest string (export name, description, context name, query)
/// the protocol allows (§Conventions: 4096 bytes).
pub const MAX_STRING: usize = 4096;
