//! The one interface every tool and daemon uses, for raw and qcow2 alike.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::datapath::{IoEpoch, Mapping, PendingWrite};
use crate::error::Result;
use crate::storage::Storage;
use crate::sync::AllocWaker;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    /// A LUKS1 volume (QEMU's `luks` driver).
    Luks,
    /// A VirtualBox disk image (see [`crate::foreign::vdi`]).
    Vdi,
    /// A Virtual PC / Hyper-V disk image (VHD, QEMU's `vpc`; see
    /// [`crate::foreign::vpc`]).
    Vpc,
    /// A VMware disk image (see [`crate::foreign::vmdk`]).
    Vmdk,
    /// A Hyper-V disk image (VHDX), read-only (see
    /// [`crate::foreign::vhdx`]).
    Vhdx,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Luks => "luks",
            Format::Vdi => "vdi",
            Format::Vpc => "vpc",
            Format::Vmdk => "vmdk",
            Format::Vhdx => "vhdx",
        }
    }
    pub fn from_name(s: &str) -> Option<Format> {
        match s {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            "luks" => Some(Format::Luks),
            "vdi" => Some(Format::Vdi),
            "vpc" => Some(Format::Vpc),
            "vmdk" => Some(Format::Vmdk),
            "vhdx" => Some(Format::Vhdx),
            _ => None,
        }
    }
}

/// Refuses a guest range that does not lie within a disk of `size`
/// bytes (one whose end overflows included): the bounds check every
/// format's guest I/O goes through.
pub(crate) fn check_range(off: u64, len: u64, size: u64) -> Result<()> {
    if off.checked_add(len).is_none_or(|e| e > size) {
        return Err(crate::Error::OutOfRange {
            offset: off,
            len,
            size,
        });
    }
    Ok(())
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
    /// The file `offset` is in ([`Image::data_file`]): 0 for every
    /// format but VMDK with extent files.
    pub file: u32,
    pub compressed: bool,
    /// The host file decides where this data reads as zeros: its holes
    /// do (QEMU's BDRV_BLOCK_RECURSE, for formats that preallocate their
    /// data, such as static VDI images). Only with an `offset`.
    pub recurse: bool,
}

/// A disk image. All methods take `&self` (or a shared `Arc`) and may be
/// called from several threads at once; implementations order concurrent
/// requests on the same data themselves.
///
/// Besides whole reads and writes, the trait has the split data path for
/// callers that move guest data themselves (a daemon's io_uring): map a
/// range ([`map_read`](Self::map_read), [`begin_write`](Self::begin_write)),
/// do the I/O on [`data_storage`](Self::data_storage) at the mapped host
/// offsets while holding an [`io_epoch`](Self::io_epoch), then end the
/// write through its guard (see [`crate::datapath`]).
pub trait Image: Send + Sync + std::fmt::Debug {
    fn format(&self) -> Format;
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;
    fn path(&self) -> &Path;
    fn is_writable(&self) -> bool;
    fn backing(&self) -> Option<&Arc<dyn Image>>;
    /// The concrete image, for operations only one format has (see
    /// `as_qcow2`, defined beside the qcow2 type so that this interface
    /// does not import it).
    fn as_any(&self) -> &dyn std::any::Any;

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
    /// A flush for a writer that is done: also gives back what it held
    /// ahead of need (qcow2: the cluster reserve of
    /// `MetadataPersistence::ProcessDeath`, and the dirty mark that
    /// covers it), with errors reported, where dropping the image would
    /// only try. The image stays usable.
    fn finish(&self) -> Result<()> {
        self.flush()
    }
    /// Status of the range starting at `offset`, covering a prefix of
    /// at most `len` bytes.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent>;
    /// Changes the virtual size.
    fn resize(&self, new_size: u64) -> Result<()>;
    /// The host file under the image.
    fn storage(&self) -> &Storage;

    // ----- the split data path -----

    /// The file guest data lives in, at the host offsets the mappings
    /// below return: the image file, or a qcow2 image's external data
    /// file.
    fn data_storage(&self) -> &Storage {
        self.storage()
    }
    /// The file an [`Extent`]'s `file` names: 0 is
    /// [`data_storage`](Self::data_storage); a format whose data spans
    /// several files (VMDK extents) numbers the others from 1.
    fn data_file(&self, file: u32) -> &Storage {
        debug_assert_eq!(file, 0);
        self.data_storage()
    }
    /// Begins data I/O that maps guest ranges and then reads or writes
    /// host clusters outside the engine's lock: until the guard is
    /// dropped, no cluster freed after this call is reused, so the I/O
    /// cannot touch another guest range's data even when the guest
    /// discards the range concurrently.
    fn io_epoch(&self) -> IoEpoch {
        IoEpoch::none()
    }
    /// Maps a prefix of the guest range [off, off + len) for reading:
    /// how it is stored in this layer, and the prefix length.
    /// [`Mapping::Data`] can be read from [`data_storage`](Self::data_storage)
    /// directly at the returned offset (under an
    /// [`io_epoch`](Self::io_epoch)); every kind can be read with
    /// [`read_mapped`](Self::read_mapped).
    fn map_read(&self, off: u64, len: u64) -> Result<(Mapping, u64)>;
    /// Reads guest bytes at `off` that [`map_read`](Self::map_read)
    /// mapped as `mapping`.
    fn read_mapped(&self, mapping: Mapping, buf: &mut [u8], off: u64) -> Result<()>;
    /// Maps a prefix of the guest write [off, off + len) to one host
    /// extent, allocating and doing copy-on-write fill where needed (see
    /// [`PendingWrite`]). Blocks while another request is allocating the
    /// same guest cluster.
    fn begin_write(self: Arc<Self>, off: u64, len: usize) -> Result<PendingWrite>;
    /// As [`begin_write`](Self::begin_write), but returns `Ok(None)`
    /// instead of waiting when another request is allocating the cluster
    /// (for event loops that must not block on another queue). `waker`
    /// is then registered on that cluster and called once its allocation
    /// ends: retry after that (the protocol is in [`crate::sync`]).
    fn try_begin_write(
        self: Arc<Self>,
        off: u64,
        len: usize,
        waker: &Arc<dyn AllocWaker>,
    ) -> Result<Option<PendingWrite>>;
    /// Waits until some allocation or in-place write ends, or `timeout`
    /// passes (for callers that poll with `try_begin_write` or in
    /// non-blocking mode and may not block for good). Images that never
    /// refuse return at once.
    fn wait_for_allocations(&self, _timeout: Duration) {}
    /// The allocation state, for a daemon's state dump; None for formats
    /// without one. Never blocks.
    fn alloc_state(&self) -> Option<String> {
        None
    }

    // ----- capabilities -----

    /// The bytes the split data path maps are the guest's own bytes.
    /// False for encrypted images: their split data path refuses
    /// (`map_read`, `begin_write`) or decrypts (`read_mapped`), and
    /// callers that move data themselves must not serve them.
    fn data_in_clear(&self) -> bool {
        true
    }

    /// A raw image whose format was probed, open for writing (QEMU's
    /// probed raw): a write that would make its first 512 bytes look
    /// like another format is refused, so that the next probe cannot
    /// open it as one (with a backing file its writer chose). Writes
    /// there must come through [`write_at`](Self::write_at), where the
    /// bytes are checked (the split data path refuses them), and
    /// requests are best 512-byte aligned, as QEMU aligns them.
    fn guards_first_sector(&self) -> bool {
        false
    }

    /// The unit in which the format allocates guest data; None when it
    /// maps every guest byte to the same file offset (raw).
    fn cluster_size(&self) -> Option<u64> {
        None
    }
    /// The smallest unit allocated on its own: the cluster, or one of its
    /// subclusters (qcow2 extended L2 entries).
    fn subcluster_size(&self) -> Option<u64> {
        self.cluster_size()
    }
    /// Guest data lives in a separate file (see
    /// [`data_storage`](Self::data_storage)).
    fn has_external_data_file(&self) -> bool {
        false
    }
    /// Write-zeroes can record zeros without writing them (qcow2 version 3
    /// zero clusters).
    fn supports_zero_clusters(&self) -> bool {
        false
    }
    /// [`write_compressed`](Self::write_compressed) is available.
    fn supports_compression(&self) -> bool {
        false
    }
    /// Every write must be a compressed whole cluster (a streamOptimized
    /// VMDK): convert writes it as `-c` would, whether asked or not.
    fn compressed_writes_only(&self) -> bool {
        false
    }
    /// Writes one whole cluster (or the image's last, partial one) at
    /// cluster-aligned `off`, compressed.
    fn write_compressed(&self, _off: u64, _data: &[u8]) -> Result<()> {
        Err(crate::Error::NotSupportedByFormat("Compression"))
    }
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
        ExtentKind::Data => match e.offset {
            // Preallocated data: the file's holes read as zeros (QEMU's
            // block layer asks the file as well, for qemu-img's convert,
            // measure, compare and map alike).
            Some(host) if e.recurse => {
                let (data, n) = img.data_file(e.file).data_at(host, e.len);
                let st = if data {
                    ChainStatus::Data
                } else {
                    ChainStatus::Zero
                };
                Ok((st, n.min(e.len)))
            }
            _ => Ok((ChainStatus::Data, e.len)),
        },
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
