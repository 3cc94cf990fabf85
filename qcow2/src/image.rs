//! The one interface every tool and daemon uses, for raw and qcow2 alike.

use std::path::Path;
use std::sync::Arc;

use crate::error::Result;
use crate::qcow::Qcow2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    /// A LUKS1 volume (QEMU's `luks` driver).
    Luks,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Luks => "luks",
        }
    }
    pub fn from_name(s: &str) -> Option<Format> {
        match s {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            "luks" => Some(Format::Luks),
            _ => None,
        }
    }
}

/// How a range of guest bytes is stored in one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Stored data in this layer.
    Data,
    /// Reads as zeros, decided by this layer.
    Zero,
    /// Not stored here: reads from the backing image (or zeros).
    Unallocated,
}

/// Answer to a block-status query: the first `len` bytes of the range
/// share `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub kind: ExtentKind,
    /// Host file offset of the first byte, where there is one.
    pub offset: Option<u64>,
    pub compressed: bool,
}

/// A disk image. All methods take `&self` and may be called from several
/// threads at once; implementations order concurrent requests on the same
/// data themselves.
pub trait Image: Send + Sync + std::fmt::Debug {
    fn format(&self) -> Format;
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;
    fn path(&self) -> &Path;
    fn is_writable(&self) -> bool;
    fn backing(&self) -> Option<&Arc<dyn Image>>;
    fn as_qcow2(&self) -> Option<&Qcow2> {
        None
    }

    /// Reads `buf.len()` bytes at guest offset `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at guest offset `offset`. Durable after `flush`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes the range read as zeros; `unmap` allows releasing its space.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;
    /// Hints that the range is unused; its content becomes unspecified
    /// (this implementation never exposes backing data where there was
    /// none before).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Status of the range starting at `offset`, covering a prefix of
    /// at most `len` bytes.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent>;
    /// Changes the virtual size.
    fn resize(&self, new_size: u64) -> Result<()>;
    /// The host file under the image.
    fn storage(&self) -> &crate::storage::Storage;
}

/// How a guest range reads through the whole backing chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainStatus {
    /// Some layer stores data here (it may still be zeros).
    Data,
    /// Reads as zeros: a zero cluster, a hole, or unallocated in every
    /// layer, or past the end of a shorter backing image.
    Zero,
}

/// Status of a prefix of [offset, offset + len) through the chain, and the
/// prefix length.
pub fn chain_status(img: &dyn Image, offset: u64, len: u64) -> Result<(ChainStatus, u64)> {
    let e = img.block_status(offset, len)?;
    match e.kind {
        ExtentKind::Data => Ok((ChainStatus::Data, e.len)),
        ExtentKind::Zero => Ok((ChainStatus::Zero, e.len)),
        ExtentKind::Unallocated => match img.backing() {
            None => Ok((ChainStatus::Zero, e.len)),
            Some(b) if offset >= b.size() => Ok((ChainStatus::Zero, e.len)),
            Some(b) => {
                let n = e.len.min(b.size() - offset);
                chain_status(b.as_ref(), offset, n)
            }
        },
    }
}
