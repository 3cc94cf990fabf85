//! Sparse extents (magic `KDMV`): a monolithicSparse or streamOptimized
//! image file, or one extent file of a descriptor's (twoGbMaxExtentSparse,
//! vmfsSparse).
//!
//! Layout (VMware's "Virtual Disk Format 5.0"; every field little-endian,
//! sizes and offsets in 512-byte sectors):
//! - a header at 0: capacity, grain size, the embedded text descriptor's
//!   place, grain table entries per table, where the grain directory (GD)
//!   and its redundant copy are, flags;
//! - the GD: one u32 per grain table (GT), the GT's sector (0: none, the
//!   whole range it covers is unallocated);
//! - each GT: one u32 per grain, the grain's sector (0: unallocated, read
//!   from the parent or as zeros; 1 with the zeroed-grain flag: zeros).
//!
//! What QEMU does, and rimg with it:
//! - nothing is checked against the file's length at open but the first
//!   grain's offset; tables and grains past the end read as zeros;
//! - the GD is held (its in-file part, `table.rs`); a GT is read from
//!   the file when a grain is looked up (the last one kept);
//! - block status answers one grain at a time, not cut at the extent's
//!   end (a grain may run on into the next extent).
//!
//! Offsets here are relative to the extent's start in the disk.

use super::super::table::Table;
use super::super::{Where, MAX_OFFSET};
use super::{le32, le64, refuse, stream, SECTOR};
use crate::error::Result;
use crate::storage::Storage;

/// The sparse extent magic, at 0 (a big-endian u32 for the probe).
pub const MAGIC: &[u8; 4] = b"KDMV";
/// Bytes of the header QEMU reads (and of each footer sector).
pub const HEADER_LEN: usize = 512;
/// Flag bits.
pub const FLAG_RGD: u32 = 1 << 1;
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Grains are compressed (streamOptimized).
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Compressed grains start with a marker (streamOptimized).
pub const FLAG_MARKER: u32 = 1 << 17;
/// GD offset of stream files, whose GD is found through a footer.
pub const GD_AT_END: u64 = u64::MAX;
/// Compression algorithm 1: deflate (streamOptimized).
pub const COMPRESSION_DEFLATE: u16 = 1;
/// GTE of a zeroed grain (with [`FLAG_ZERO_GRAIN`]).
const GTE_ZEROED: u32 = 1;
/// Most grain table entries per table QEMU takes.
pub const MAX_GTES: u32 = 512;
/// Largest grain QEMU takes, in sectors (1 GiB).
pub const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// Most GD entries QEMU takes.
pub const MAX_GD_ENTRIES: u32 = 32 * 1024 * 1024;
/// QEMU's largest request (2^31 - 512).
const MAX_REQUEST: u64 = (i32::MAX as u64) & !(SECTOR - 1);

/// Header field offsets (from the start of the file, magic included).
pub mod at {
    pub const VERSION: usize = 4;
    pub const FLAGS: usize = 8;
    pub const CAPACITY: usize = 12;
    pub const GRAIN: usize = 20;
    pub const DESC_OFFSET: usize = 28;
    pub const DESC_SIZE: usize = 36;
    pub const GTES_PER_GT: usize = 44;
    pub const RGD_OFFSET: usize = 48;
    pub const GD_OFFSET: usize = 56;
    pub const GRAIN_OFFSET: usize = 64;
    pub const COMPRESSION: usize = 77;
}

/// Whether QEMU's block layer reads `len` bytes at `off`.
pub(super) fn readable(off: u64, len: u64) -> bool {
    len <= MAX_REQUEST && off <= MAX_OFFSET - len.min(MAX_OFFSET)
}

/// The sparse extent header fields rimg uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub flags: u32,
    /// Sectors.
    pub capacity: u64,
    /// Sectors per grain.
    pub grain: u64,
    pub desc_offset: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub grain_offset: u64,
    pub compression: u16,
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            version: le32(b, at::VERSION),
            flags: le32(b, at::FLAGS),
            capacity: le64(b, at::CAPACITY),
            grain: le64(b, at::GRAIN),
            desc_offset: le64(b, at::DESC_OFFSET),
            gtes_per_gt: le32(b, at::GTES_PER_GT),
            rgd_offset: le64(b, at::RGD_OFFSET),
            gd_offset: le64(b, at::GD_OFFSET),
            grain_offset: le64(b, at::GRAIN_OFFSET),
            compression: u16::from_le_bytes([b[at::COMPRESSION], b[at::COMPRESSION + 1]]),
        }
    }
}

/// A sparse extent's header, grain directory and caches.
#[derive(Debug)]
pub struct Sparse {
    pub(super) header: Header,
    /// Sectors one GD entry covers (GTEs per GT times the grain), at most
    /// 2^30.
    gd_entry_sectors: u64,
    /// GD entries, as QEMU counts them (its u32, wrapped): a lookup past
    /// them cannot say where the grain is.
    pub(super) gd_entries: u32,
    /// The GD (u32 GT sectors); past the end of the file, zero.
    gd: Table,
    zero_grain: bool,
    /// The last GT looked up: its sector (0: none) and bytes (at most
    /// 2 KiB); a write's new GTE is put in it ([`Sparse::note_gte`]).
    gt_cache: std::sync::Mutex<(u32, Vec<u8>)>,
    /// Grains are deflate-compressed (streamOptimized).
    pub(super) compressed: bool,
    /// The GD was found through a footer (a stream as VMware writes it).
    pub(super) gd_at_end: bool,
    /// The redundant GD (with [`FLAG_RGD`]), which writes keep in step.
    rgd: Option<Table>,
    /// Sector of the next grain a write allocates: the file's end,
    /// rounded up to a grain (QEMU's next_cluster_sector).
    pub(super) next: std::sync::atomic::AtomicU64,
    /// The last grain inflated whole: its host offset (0: none) and
    /// bytes (grains up to [`stream::CACHED_GRAIN`]).
    grain_cache: std::sync::Mutex<(u64, Vec<u8>)>,
}

/// How the grain holding a sector is stored.
pub(super) enum GrainAt {
    Broken,
    Unallocated,
    Zero,
    Data(u64),
}

impl Sparse {
    /// Decodes the sparse extent in `st` from its header `h` (the magic
    /// checked; an embedded descriptor handled by the caller).
    /// `footer_len` is the length a stream's footer is found against:
    /// QEMU takes the image file's, the descriptor's for an extent file.
    pub(super) fn read(st: &Storage, mut h: Header, footer_len: u64) -> Result<Sparse> {
        let file_len = st.len()?.next_multiple_of(SECTOR);
        let gd_at_end = h.gd_offset == GD_AT_END;
        if gd_at_end {
            // A stream as VMware writes it: the footer's header counts.
            h = stream::footer_header(st, footer_len)?;
        }
        if h.version > 3 {
            return Err(refuse(format!("Unsupported VMDK version {}", h.version)));
        }
        if h.gtes_per_gt > MAX_GTES {
            return Err(refuse("L2 table size too big"));
        }
        // QEMU holds this product in a u32.
        let gd_entry_sectors = (h.gtes_per_gt as u64).wrapping_mul(h.grain) as u32;
        if gd_entry_sectors == 0 {
            return Err(refuse("L1 entry size is invalid"));
        }
        // QEMU's u64 arithmetic, kept in its u32.
        let gd_entries =
            (h.capacity.wrapping_add(gd_entry_sectors as u64 - 1) / gd_entry_sectors as u64) as u32;
        if file_len / SECTOR < h.grain_offset {
            return Err(refuse(format!(
                "File truncated, expecting at least {} bytes",
                h.grain_offset.wrapping_mul(SECTOR) as i64
            )));
        }
        if h.grain > MAX_GRAIN_SECTORS {
            return Err(refuse("Invalid granularity, image may be corrupt"));
        }
        if gd_entries > MAX_GD_ENTRIES {
            return Err(refuse("L1 size too big"));
        }
        // Grain at most 2^21 sectors and at most 512 GTEs: the u32 above
        // did not wrap.
        let gd_entry_sectors = gd_entry_sectors as u64;
        let gd_len = gd_entries as u64 * 4;
        let name = st.path().display();
        let gd_at = h.gd_offset.wrapping_mul(SECTOR);
        if !readable(gd_at, gd_len) {
            return Err(refuse(format!(
                "Could not read l1 table from extent '{name}': Input/output error"
            )));
        }
        let gd = Table::load(st, gd_at, gd_len)?;
        let rgd_at = h.rgd_offset.wrapping_mul(SECTOR);
        if h.flags & FLAG_RGD != 0 && !readable(rgd_at, gd_len) {
            // QEMU reads the copy too (and uses it to write).
            return Err(refuse(format!(
                "Could not read l1 backup table from extent '{name}': Input/output error"
            )));
        }
        let rgd = match h.flags & FLAG_RGD != 0 && st.writable() {
            true => Some(Table::load(st, rgd_at, gd_len)?),
            false => None,
        };
        let next = (file_len / SECTOR).next_multiple_of(h.grain.max(1));
        Ok(Sparse {
            zero_grain: h.flags & FLAG_ZERO_GRAIN != 0,
            compressed: h.compression == COMPRESSION_DEFLATE,
            gd_at_end,
            header: h,
            gd_entry_sectors,
            gd_entries,
            gd,
            gt_cache: std::sync::Mutex::new((0, Vec::new())),
            grain_cache: std::sync::Mutex::new((0, Vec::new())),
            rgd,
            next: std::sync::atomic::AtomicU64::new(next),
        })
    }

    /// The GT (a sector, never 0) and entry index of the grain holding
    /// extent sector `sector`; None where the GD has no table for it.
    pub(super) fn gt_slot(&self, sector: u64) -> Option<(u32, u64)> {
        let gd_index = self.gd_index(sector);
        let gt = (gd_index < self.gd_entries as u64).then(|| self.gd.u32_le(gd_index))?;
        let i = (sector / self.header.grain) % self.header.gtes_per_gt as u64;
        (gt != 0).then_some((gt, i))
    }

    /// The redundant GT of extent sector `sector`, if there is one.
    pub(super) fn backup_gt(&self, sector: u64) -> Option<u32> {
        let gd_index = self.gd_index(sector);
        let gt = self.rgd.as_ref()?.u32_le(gd_index);
        (gd_index < self.gd_entries as u64 && gt != 0).then_some(gt)
    }

    /// A GTE just written to the file: the cached GT follows it.
    pub(super) fn note_gte(&self, gt: u32, i: u64, v: u32) {
        let mut cache = self.gt_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0 == gt {
            let i = i as usize * 4;
            cache.1[i..i + 4].copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Sectors per grain.
    pub(super) fn grain_sectors(&self) -> u64 {
        self.header.grain
    }

    pub(super) fn grain_bytes(&self) -> u64 {
        self.header.grain * SECTOR
    }

    /// The GTE of the grain holding extent sector `sector`: None when the
    /// GD cannot say (QEMU's VMDK_ERROR), Some(0) when unallocated.
    fn gte(&self, st: &Storage, sector: u64) -> Result<Option<u32>> {
        let gd_index = self.gd_index(sector);
        if gd_index >= self.gd_entries as u64 {
            return Ok(None);
        }
        let gt = self.gd.u32_le(gd_index);
        if gt == 0 {
            return Ok(Some(0));
        }
        let i = ((sector / self.header.grain) % self.header.gtes_per_gt as u64) as usize;
        let mut cache = self.gt_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0 != gt {
            // At most 2^41 + 2^11: inside what a read takes.
            cache.1.resize(self.header.gtes_per_gt as usize * 4, 0);
            st.read_at(&mut cache.1, gt as u64 * SECTOR)?;
            cache.0 = gt;
        }
        Ok(Some(u32::from_le_bytes(
            cache.1[i * 4..i * 4 + 4].try_into().unwrap(),
        )))
    }

    /// How the grain holding extent sector `sector` is stored.
    pub(super) fn grain_at(&self, st: &Storage, sector: u64) -> Result<GrainAt> {
        Ok(match self.gte(st, sector)? {
            None => GrainAt::Broken,
            Some(0) => GrainAt::Unallocated,
            Some(GTE_ZEROED) if self.zero_grain => GrainAt::Zero,
            Some(s) => GrainAt::Data(s as u64 * SECTOR),
        })
    }

    /// Where the unallocated run of a missing GT that holds extent
    /// sector `sector` ends (None: its GT exists, or the GD cannot say),
    /// so that a walk passes over it at once.
    pub(super) fn missing_gt_end(&self, sector: u64) -> Option<u64> {
        let gd_index = self.gd_index(sector);
        (gd_index < self.gd_entries as u64 && self.gd.u32_le(gd_index) == 0)
            .then(|| (sector / self.gd_entry_sectors + 1) * self.gd_entry_sectors)
    }

    /// The GD index of extent sector `sector`, in QEMU's unsigned int
    /// (wrapped past 2^32 entries' worth of sectors).
    fn gd_index(&self, sector: u64) -> u64 {
        (sector / self.gd_entry_sectors) as u32 as u64
    }

    /// Where extent bytes [off, off + len) start (in file `file`, which
    /// is `st`), and how many of them one grain holds: the run is not cut
    /// at the extent's end, as QEMU's is not.
    pub(super) fn lookup(
        &self,
        st: &Storage,
        file: u32,
        off: u64,
        len: u64,
    ) -> Result<(Where, u64)> {
        let grain = self.grain_bytes();
        let in_grain = off % grain;
        let n = len.min(grain - in_grain);
        let w = match self.grain_at(st, off / SECTOR)? {
            GrainAt::Broken => Where::Broken,
            GrainAt::Unallocated => Where::Unallocated,
            GrainAt::Zero => Where::Zero,
            GrainAt::Data(host) if self.compressed => Where::Compressed {
                file,
                host,
                skip: in_grain,
            },
            GrainAt::Data(host) => Where::Data {
                file,
                host: host + in_grain,
                recurse: false,
            },
        };
        Ok((w, n))
    }

    /// Reads `buf.len()` bytes from `skip` on of the grain compressed at
    /// `host`.
    pub(super) fn read_compressed(
        &self,
        st: &Storage,
        host: u64,
        skip: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let grain = self.grain_bytes();
        let marker = self.header.flags & FLAG_MARKER != 0;
        let need = skip + buf.len() as u64;
        if grain > stream::CACHED_GRAIN {
            return stream::inflate(st, host, grain, marker, need, |at, piece| {
                stream::copy_overlap(piece, at, skip, buf)
            });
        }
        let mut cache = self.grain_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0 != host || cache.0 == 0 {
            cache.0 = 0;
            cache.1.clear();
            let bytes = &mut cache.1;
            stream::inflate(st, host, grain, marker, 0, |_, piece| {
                bytes.extend_from_slice(piece)
            })?;
            cache.0 = host;
        }
        // What QEMU's read asks of the inflated grain: to cover the range.
        let data = cache
            .1
            .get(skip as usize..need as usize)
            .ok_or_else(stream::einval)?;
        buf.copy_from_slice(data);
        Ok(())
    }
}
