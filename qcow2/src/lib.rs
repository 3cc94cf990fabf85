//! rimg's qcow2 engine: qcow2 (versions 2 and 3), raw and LUKS disk images
//! behind one [`Image`] interface, and read-only images of other formats
//! (VDI, VHD, VMDK; see [`foreign`]).
//!
//! The on-disk format is QEMU's, as specified in docs/interop/qcow2.rst;
//! module docs cite its sections where the layout is decoded.
//!
//! # Threading
//! An [`Image`] is `Send + Sync`: several threads (for example one per
//! virtqueue) may read and write the same image at once. The qcow2 type
//! keeps all metadata behind one mutex that is never held across guest
//! data I/O; allocating writes register the guest clusters they are
//! allocating so that concurrent requests touching the same clusters wait
//! for the allocation to commit. See [`qcow`] for the exact model and the
//! write ordering that keeps images consistent across crashes.
//!
//! Callers that move guest data themselves (a daemon's io_uring) use the
//! split data path on [`Image`]: map, do the I/O outside the lock, end it
//! through the guards of [`datapath`], the same way for raw and qcow2.
//!
//! # Untrusted input
//! Every header field, table entry and offset read from a file is
//! validated before use. Tables are bounded as QEMU bounds them (L1 at
//! 32 MiB, refcount table at 8 MiB, 65536 snapshots), so opening a hostile
//! image allocates at most a few tens of MiB and never panics.

pub mod amend;
pub mod amend_progress;
pub mod bitmap;
pub mod blockstatus;
pub(crate) mod cache;
pub mod check;
pub mod checksum;
pub mod compress;
pub mod create;
pub mod crypto;
pub mod datafile;
pub mod datapath;
mod dirty_open;
mod downgrade;
pub mod encrypt;
pub mod error;
pub mod foreign;
#[cfg(feature = "fuzz-targets")]
pub mod fuzz_targets;
pub mod header;
pub mod image;
pub mod l2;
pub mod luks;
pub mod luks_amend;
pub mod luks_image;
mod make_empty;
pub mod nbd;
pub mod open;
pub(crate) mod overlap;
pub mod pagebuf;
pub mod paths;
pub mod preallocation;
pub mod qcow;
pub mod raw;
pub(crate) mod refcount;
pub mod snapshot;
pub mod snapshot_l1;
mod snapshot_refs;
pub mod storage;
pub mod sync;
pub mod units;
pub mod zeros;

pub use amend::Amend;
pub use check::{CheckReport, Repair};
pub use create::{create, create_luks, CreateOptions, Preallocation};
pub use datapath::{IoEpoch, Mapping, PendingWrite};
pub use error::{Error, Result};
pub use foreign::vdi::Vdi;
pub use foreign::vmdk::Vmdk;
pub use foreign::vpc::Vpc;
pub use header::{CompressionType, Header};
pub use image::{chain_status, ChainStatus, Extent, ExtentKind, Format, Image};
pub use luks_image::LuksImage;
pub use open::{open, probe, resolve_backing, OpenOptions};
pub use qcow::{MetadataPersistence, Qcow2, Qcow2Options};
pub use raw::Raw;
pub use snapshot::Snapshot;
pub use sync::AllocWaker;
pub use units::{GuestCluster, GuestOffset, HostOffset};
