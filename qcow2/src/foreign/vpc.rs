//! VHD images (Connectix/Microsoft Virtual PC, QEMU's `vpc` driver),
//! fixed and dynamic, as QEMU's vpc driver reads them (creating and
//! writing them: `vpc/write.rs`).
//!
//! Layout (Microsoft's "Virtual Hard Disk Image Format Specification";
//! every field big-endian):
//! - a 512-byte *footer* (cookie `conectix`, checksum, geometry, sizes,
//!   disk type). A fixed disk is the guest's bytes followed by the footer;
//!   a dynamic disk starts with a copy of the footer and ends with it.
//! - dynamic disks: a 1024-byte *dynamic header* (cookie `cxsparse`) at
//!   the footer's data offset, naming the *BAT* (block allocation table:
//!   one u32 sector number per block, 0xffffffff = not allocated). An
//!   allocated block is a sector bitmap followed by the block's data.
//!
//! What QEMU does, and rimg with it:
//! - The footer is looked for at offset 0 first; only without it, in the
//!   last 512 bytes of the file, where it must say "fixed". A footer at 0
//!   opens the image as dynamic whatever its type says (a differencing
//!   disk reads as a dynamic disk without its parent), yet reads, block
//!   status and the cluster size follow the type field: a footer at 0
//!   that says "fixed" reads the file as a fixed disk once the dynamic
//!   header and BAT have passed their checks.
//! - The per-sector bitmaps are ignored: an allocated block is data in
//!   full, an unallocated one reads as zeros.
//! - The virtual size is the CHS geometry's or the footer's current size,
//!   by the creator application (see [`Footer::sectors`]).
//! - The file is measured in whole sectors (its length rounded up), and
//!   bytes past its end read as zeros, the BAT's included.
//!
//! Opening refuses what QEMU refuses, in its order and with its words
//! (qemu-img prints them after `Could not open 'F': `).

use std::sync::atomic::AtomicU64;
use std::sync::{RwLock, RwLockReadGuard};

use super::table::Table;
use super::{ForeignImage, Layout, Where};
use crate::error::{Error, Result};
use crate::image::Format;
use crate::storage::Storage;

/// A VHD image.
pub type Vpc = ForeignImage<VpcLayout>;

/// Bytes of the footer.
pub const FOOTER_LEN: usize = 512;
/// The footer's cookie, at its start (QEMU probes for it at offset 0).
pub const COOKIE: &[u8; 8] = b"conectix";
/// Bytes of the dynamic disk header, and its cookie.
pub const DYN_HEADER_LEN: usize = 1024;
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// Disk type 2: fixed (3 dynamic, 4 differencing).
pub const TYPE_FIXED: u32 = 2;
const SECTOR: u64 = 512;
/// The largest CHS geometry, 65535 cylinders, 16 heads, 255 sectors: a
/// disk that has it is too large for CHS, and its current size counts.
pub const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
/// Most sectors QEMU opens: 2040 GiB.
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// BAT entry of a block that is not allocated.
const UNALLOCATED: u32 = 0xffff_ffff;
/// Most BAT entries QEMU takes (it holds the count in an int and reads
/// the table in one request).
pub const MAX_TABLE_ENTRIES: u32 = i32::MAX as u32 / 4;
/// Reads QEMU's block layer refuses: past 2^63 - 2^30 (its largest
/// offset), or of more than 2^31 - 512 bytes in one request.
const MAX_OFFSET: u64 = (i64::MAX as u64) & !((1 << 30) - 1);
const MAX_REQUEST: u64 = (i32::MAX as u64) & !(SECTOR - 1);

mod write;
pub use write::{create, Subformat};

/// Footer field offsets.
mod at {
    pub const FEATURES: usize = 8;
    pub const VERSION: usize = 12;
    pub const DATA_OFFSET: usize = 16;
    pub const TIMESTAMP: usize = 24;
    pub const CREATOR_APP: usize = 28;
    pub const CREATOR_VERSION: usize = 32;
    pub const CREATOR_OS: usize = 36;
    pub const ORIG_SIZE: usize = 40;
    pub const CURRENT_SIZE: usize = 48;
    pub const CYLINDERS: usize = 56;
    pub const HEADS: usize = 58;
    pub const SECTORS: usize = 59;
    pub const DISK_TYPE: usize = 60;
    pub const CHECKSUM: usize = 64;
    pub const UUID: usize = 68;
}

/// Dynamic header field offsets.
mod dyn_at {
    pub const DATA_OFFSET: usize = 8;
    pub const TABLE_OFFSET: usize = 16;
    pub const VERSION: usize = 24;
    pub const MAX_TABLE_ENTRIES: usize = 28;
    pub const BLOCK_SIZE: usize = 32;
    pub const CHECKSUM: usize = 36;
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn refuse(msg: impl Into<String>) -> Error {
    Error::Format(msg.into())
}

/// Whether QEMU's block layer reads `len` bytes at `off` (else the read
/// fails before it reaches the file).
fn readable(off: u64, len: u64) -> bool {
    len <= MAX_REQUEST && off <= MAX_OFFSET - len
}

/// How the virtual size is decided: QEMU's `force_size_calc` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SizeCalc {
    /// By the creator application and the geometry (no option).
    #[default]
    Auto,
    /// `chs`: the geometry, unless it is the maximum one.
    Chs,
    /// `current_size`: the footer's current size.
    CurrentSize,
}

impl SizeCalc {
    /// The option's value as given (None: not given); anything but `chs`
    /// and `current_size` is refused with QEMU's message.
    pub fn parse(v: Option<&str>) -> Result<SizeCalc> {
        match v {
            None => Ok(SizeCalc::Auto),
            Some("chs") => Ok(SizeCalc::Chs),
            Some("current_size") => Ok(SizeCalc::CurrentSize),
            Some(v) => Err(refuse(format!("Invalid size calculation mode: '{v}'"))),
        }
    }
}

/// The footer fields rimg uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Dynamic disks: where the dynamic header is.
    pub data_offset: u64,
    pub creator_app: [u8; 4],
    pub current_size: u64,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
    pub disk_type: u32,
}

impl Footer {
    /// The one's complement of the byte sum of the footer with its
    /// checksum field taken as zero (the spec's "Checksum" field).
    pub fn checksum(b: &[u8; FOOTER_LEN]) -> u32 {
        let sum = b
            .iter()
            .enumerate()
            .filter(|(i, _)| !(at::CHECKSUM..at::CHECKSUM + 4).contains(i))
            .fold(0u32, |s, (_, &x)| s.wrapping_add(x as u32));
        !sum
    }

    /// Reads the fields and verifies the checksum (the cookie is the
    /// caller's: where the footer was found decides what a missing one
    /// means).
    pub fn parse(b: &[u8; FOOTER_LEN]) -> Result<Footer> {
        if be32(b, at::CHECKSUM) != Footer::checksum(b) {
            return Err(refuse("Incorrect header checksum"));
        }
        Ok(Footer {
            data_offset: be64(b, at::DATA_OFFSET),
            creator_app: b[at::CREATOR_APP..at::CREATOR_APP + 4].try_into().unwrap(),
            current_size: be64(b, at::CURRENT_SIZE),
            cylinders: u16::from_be_bytes(b[at::CYLINDERS..at::CYLINDERS + 2].try_into().unwrap()),
            heads: b[at::HEADS],
            sectors_per_track: b[at::SECTORS],
            disk_type: be32(b, at::DISK_TYPE),
        })
    }

    /// The virtual size in sectors. Virtual PC sizes a disk by its CHS
    /// geometry (which rounds the size asked for), Hyper-V and most other
    /// creators by the current size; QEMU tells them apart by the creator
    /// application: `vpc ` (Virtual PC) and `qemu` (QEMU without
    /// force_size) mean the geometry, anything else (`win `, `qem2`,
    /// `d2v `, ...) the current size, rounded down to a sector. A disk at
    /// the maximum geometry is larger than CHS can say: its current size
    /// counts whatever the app or the option. More than 2040 GiB is
    /// refused as QEMU does (EFBIG).
    pub fn sectors(&self, calc: SizeCalc) -> Option<u64> {
        let chs = self.cylinders as u64 * self.heads as u64 * self.sectors_per_track as u64;
        let use_chs = matches!(&self.creator_app, b"vpc " | b"qemu") || calc == SizeCalc::Chs;
        let sectors = if !use_chs || chs == MAX_GEOMETRY || calc == SizeCalc::CurrentSize {
            self.current_size / SECTOR
        } else {
            chs
        };
        (sectors <= MAX_SECTORS).then_some(sectors)
    }
}

/// A dynamic disk's block allocation.
#[derive(Debug)]
pub struct Dynamic {
    /// A power of two, at least 512.
    pub block_size: u64,
    /// Bytes of the sector bitmap before each block's data.
    pub bitmap_size: u64,
    /// The header's entry count (at most [`MAX_TABLE_ENTRIES`]).
    pub max_table_entries: u32,
    /// Where the BAT lies in the file.
    table_offset: u64,
    /// The BAT (u32 sector numbers); entries past the end of the file
    /// are zero, as QEMU's zero-filled read gives them: a block at
    /// sector 0.
    bat: RwLock<Table>,
    /// Where the next block goes (QEMU's free_data_block_offset): past
    /// the BAT and every allocated block, where the footer is.
    next: AtomicU64,
    /// The block whose bitmap a write last set (QEMU's
    /// last_bitmap_offset, as a block number).
    last_bitmap: AtomicU64,
}

impl Dynamic {
    fn table(&self) -> RwLockReadGuard<'_, Table> {
        self.bat.read().unwrap_or_else(|e| e.into_inner())
    }

    /// BAT entry of guest block `b`: unallocated past the table.
    fn entry(&self, b: u64) -> u32 {
        if b >= self.max_table_entries as u64 {
            return UNALLOCATED;
        }
        self.table().u32_be(b)
    }

    /// Where the data of guest block `b` starts in the file, None when
    /// it is not allocated.
    fn block_data(&self, b: u64) -> Option<u64> {
        match self.entry(b) {
            UNALLOCATED => None,
            // At most 2^41 + 2^19: no overflow.
            e => Some(e as u64 * SECTOR + self.bitmap_size),
        }
    }
}

/// A VHD image's footer, size, and (dynamic disks) BAT.
#[derive(Debug)]
pub struct VpcLayout {
    footer: Footer,
    /// The footer as read, which a dynamic disk's writes move to the new
    /// end of the file unchanged (as QEMU does).
    footer_bytes: [u8; FOOTER_LEN],
    /// Virtual size in bytes.
    size: u64,
    /// None when the footer's type says fixed: the guest's bytes are the
    /// file's.
    dynamic: Option<Dynamic>,
}

/// Opens a VHD image, its size decided as `calc` says.
pub fn open(st: Storage, calc: SizeCalc) -> Result<Vpc> {
    let layout = VpcLayout::read(&st, calc)?;
    ForeignImage::new(st, layout)
}

impl VpcLayout {
    fn read(st: &Storage, calc: SizeCalc) -> Result<VpcLayout> {
        // QEMU's block layer sees the file in whole sectors.
        let file_len = st.len()?.next_multiple_of(SECTOR);
        let mut b = [0u8; FOOTER_LEN];
        st.read_at(&mut b, 0)?;
        let footer_at_start = &b[..8] == COOKIE;
        if !footer_at_start {
            // A fixed disk: its footer is in its last sector only.
            if file_len < FOOTER_LEN as u64 {
                return Err(refuse("File too small for a VHD header"));
            }
            st.read_at(&mut b, file_len - FOOTER_LEN as u64)?;
            if &b[..8] != COOKIE || be32(&b, at::DISK_TYPE) != TYPE_FIXED {
                return Err(refuse("invalid VPC image"));
            }
        }
        let footer = Footer::parse(&b)?;
        let Some(sectors) = footer.sectors(calc) else {
            // EFBIG, which QEMU prints as the file's open error.
            return Err(refuse(format!(
                "Could not open '{}': File too large",
                st.path().display()
            )));
        };
        let size = sectors * SECTOR;
        let dynamic = match footer_at_start {
            true => Some(read_dynamic(st, &footer, size, file_len)?),
            false => None,
        };
        Ok(VpcLayout {
            dynamic: dynamic.filter(|_| footer.disk_type != TYPE_FIXED),
            footer,
            footer_bytes: b,
            size,
        })
    }

    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The block allocation of a dynamic disk; None for a fixed one.
    pub fn dynamic(&self) -> Option<&Dynamic> {
        self.dynamic.as_ref()
    }
}

/// The dynamic header and BAT of an image of `size` bytes whose file is
/// `file_len` bytes (whole sectors), checked as QEMU checks them.
fn read_dynamic(st: &Storage, footer: &Footer, size: u64, file_len: u64) -> Result<Dynamic> {
    let mut h = [0u8; DYN_HEADER_LEN];
    if !readable(footer.data_offset, DYN_HEADER_LEN as u64) {
        return Err(refuse("Error reading dynamic VHD header"));
    }
    st.read_at(&mut h, footer.data_offset)?;
    if &h[..8] != DYN_COOKIE {
        return Err(refuse("Invalid header magic"));
    }
    let block_size = be32(&h, dyn_at::BLOCK_SIZE);
    if !block_size.is_power_of_two() || (block_size as u64) < SECTOR {
        return Err(refuse(format!("Invalid block size {block_size}")));
    }
    let block_size = block_size as u64;
    // One bit per sector, in whole sectors.
    let bitmap_size = (block_size / (8 * SECTOR)).next_multiple_of(SECTOR);
    let raw_entries = be32(&h, dyn_at::MAX_TABLE_ENTRIES);
    // Cannot happen (2040 GiB in 512-byte blocks fit), kept as QEMU has it.
    if size / block_size > u32::MAX as u64 {
        return Err(refuse("Too many blocks"));
    }
    // QEMU holds the count in an int: from 2^31 on it is negative, the
    // room computed from it (sign-extended, times the block size) wraps
    // to near 2^64, and the count's own check speaks (negative).
    let signed = raw_entries as i32;
    if (signed as i64 as u64).wrapping_mul(block_size) < size {
        return Err(refuse("Page table too small"));
    }
    if signed < 0 || raw_entries > MAX_TABLE_ENTRIES {
        return Err(refuse(format!("Max Table Entries too large ({signed})")));
    }
    let table_offset = be64(&h, dyn_at::TABLE_OFFSET);
    let table_len = raw_entries as u64 * 4;
    if !readable(table_offset, table_len) {
        return Err(refuse("Error reading pagetable"));
    }
    // Held: the part inside the file (so at most the file's size).
    let bat = Table::load(st, table_offset, table_len)?;
    // Where QEMU would allocate the next block: past the BAT and past
    // every allocated block. Past the end of the file means the file was
    // cut short; this bounds every block by the file.
    let mut next = (table_offset + table_len).next_multiple_of(SECTOR);
    let held = bat.entries_in_file(4).min(raw_entries as u64);
    let block_end = |e: u32| e as u64 * SECTOR + bitmap_size + block_size;
    for i in 0..held {
        match bat.u32_be(i) {
            UNALLOCATED => {}
            e => next = next.max(block_end(e)),
        }
    }
    if held < raw_entries as u64 {
        // The entries past the end of the file are all 0.
        next = next.max(block_end(0));
    }
    if next > file_len {
        return Err(refuse(
            "block-vpc: free_data_block_offset points after the end of file. \
             The image has been truncated.",
        ));
    }
    Ok(Dynamic {
        block_size,
        bitmap_size,
        max_table_entries: raw_entries,
        table_offset,
        bat: RwLock::new(bat),
        next: AtomicU64::new(next),
        last_bitmap: AtomicU64::new(u64::MAX),
    })
}

impl Layout for VpcLayout {
    fn format(&self) -> Format {
        Format::Vpc
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn cluster_size(&self) -> Option<u64> {
        self.dynamic.as_ref().map(|d| d.block_size)
    }
    fn lookup(&self, _st: &Storage, off: u64, len: u64) -> Result<(Where, u64)> {
        let Some(d) = &self.dynamic else {
            // Fixed: guest byte g is file byte g, preallocated (the file's
            // holes read as zeros).
            return Ok((
                Where::Data {
                    file: 0,
                    host: off,
                    recurse: true,
                },
                len,
            ));
        };
        let block = off / d.block_size;
        let in_block = off % d.block_size;
        let mut n = len.min(d.block_size - in_block);
        if let Some(data) = d.block_data(block) {
            return Ok((
                Where::Data {
                    file: 0,
                    host: data + in_block,
                    recurse: false,
                },
                n,
            ));
        }
        // QEMU's block status runs on over the following unallocated
        // blocks (never over an allocated one: its bitmap sits between).
        // At most one step per BAT entry held in memory: entries past the
        // end of the file are 0, allocated.
        let mut next = block + 1;
        while n < len && d.block_data(next).is_none() {
            n += (len - n).min(d.block_size);
            next += 1;
        }
        Ok((Where::Zero, n))
    }
    fn alloc_unit(&self) -> Option<u64> {
        // A new block is staged in memory: blocks past 32 MiB (QEMU,
        // Virtual PC and Hyper-V make 2 MiB ones; a hostile header may
        // claim 2 GiB) are not written.
        match &self.dynamic {
            None => Some(write::FIXED_UNIT),
            Some(d) => (d.block_size <= 32 << 20).then_some(d.block_size),
        }
    }
    fn before_write(&self, st: &Storage, off: u64) -> Result<()> {
        match &self.dynamic {
            Some(d) => write::mark_block(d, st, off / d.block_size),
            None => Ok(()),
        }
    }
    fn allocate(
        &self,
        st: &Storage,
        index: u64,
        data: &[u8],
        written: std::ops::Range<usize>,
    ) -> Result<()> {
        write::allocate(self, st, index, data, written)
    }
}

/// Whether `first` (the first bytes of a file, zero-padded) starts with
/// the footer's cookie: QEMU's vpc probe. A fixed disk has no footer at
/// 0 and probes as raw.
pub fn probe(first: &[u8]) -> bool {
    first.starts_with(COOKIE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A footer for a 5 MiB disk at the geometry QEMU gives it
    /// (151/4/17 = 5257216 bytes), app `qemu`, dynamic.
    fn footer() -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[..8].copy_from_slice(COOKIE);
        b[at::DATA_OFFSET..at::DATA_OFFSET + 8].copy_from_slice(&512u64.to_be_bytes());
        b[at::CREATOR_APP..at::CREATOR_APP + 4].copy_from_slice(b"qemu");
        b[at::CURRENT_SIZE..at::CURRENT_SIZE + 8].copy_from_slice(&(5u64 << 20).to_be_bytes());
        b[at::CYLINDERS..at::CYLINDERS + 2].copy_from_slice(&151u16.to_be_bytes());
        b[at::HEADS] = 4;
        b[at::SECTORS] = 17;
        b[at::DISK_TYPE..at::DISK_TYPE + 4].copy_from_slice(&3u32.to_be_bytes());
        seal(&mut b);
        b
    }

    fn seal(b: &mut [u8; FOOTER_LEN]) {
        let c = Footer::checksum(b);
        b[at::CHECKSUM..at::CHECKSUM + 4].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn checksum_and_size_rules() {
        let mut b = footer();
        let f = Footer::parse(&b).unwrap();
        assert_eq!(f.sectors(SizeCalc::Auto), Some(151 * 4 * 17));
        assert_eq!(f.sectors(SizeCalc::CurrentSize), Some(10240));
        assert_eq!(f.sectors(SizeCalc::Chs), Some(151 * 4 * 17));
        // The checksum covers every byte but its own field.
        b[500] = 1;
        assert_eq!(
            Footer::parse(&b).unwrap_err().to_string(),
            "Incorrect header checksum"
        );
        // Hyper-V's app: the current size, rounded down to a sector.
        b[at::CREATOR_APP..at::CREATOR_APP + 4].copy_from_slice(b"win ");
        b[at::CURRENT_SIZE + 7] = 100;
        seal(&mut b);
        let f = Footer::parse(&b).unwrap();
        assert_eq!(f.sectors(SizeCalc::Auto), Some(10240));
        assert_eq!(f.sectors(SizeCalc::Chs), Some(151 * 4 * 17));
        // The maximum geometry: the current size, even when told CHS.
        b[at::CREATOR_APP..at::CREATOR_APP + 4].copy_from_slice(b"vpc ");
        b[at::CYLINDERS..at::CYLINDERS + 2].copy_from_slice(&65535u16.to_be_bytes());
        b[at::HEADS] = 16;
        b[at::SECTORS] = 255;
        seal(&mut b);
        let f = Footer::parse(&b).unwrap();
        assert_eq!(f.sectors(SizeCalc::Chs), Some(10240));
        // 2040 GiB is the most.
        let mut f = f;
        f.current_size = MAX_SECTORS * SECTOR + 511;
        assert_eq!(f.sectors(SizeCalc::Auto), Some(MAX_SECTORS));
        f.current_size += 1;
        assert_eq!(f.sectors(SizeCalc::Auto), None);
        assert_eq!(
            SizeCalc::parse(Some("bad")).unwrap_err().to_string(),
            "Invalid size calculation mode: 'bad'"
        );
        assert_eq!(SizeCalc::parse(None).unwrap(), SizeCalc::Auto);
    }

    #[test]
    fn reads_qemu_would_refuse() {
        assert!(readable(MAX_OFFSET - 1024, 1024));
        assert!(!readable(MAX_OFFSET - 1023, 1024));
        assert!(readable(0, 0x7fff_fe00));
        assert!(!readable(0, 0x7fff_fe04));
        assert!(!readable(u64::MAX, 0));
    }

    fn dynamic(entries: &[u32], block_size: u64) -> VpcLayout {
        let mut bytes = Vec::new();
        for e in entries {
            bytes.extend(e.to_be_bytes());
        }
        let p = std::env::temp_dir().join(format!(
            "rimg-vpc-bat-{}-{}-{block_size}",
            std::process::id(),
            entries.len()
        ));
        std::fs::write(&p, &bytes).unwrap();
        let st = Storage::open(&p, false).unwrap();
        let bat = Table::load(&st, 0, entries.len() as u64 * 4).unwrap();
        std::fs::remove_file(&p).unwrap();
        VpcLayout {
            footer: Footer::parse(&footer()).unwrap(),
            footer_bytes: footer(),
            size: entries.len() as u64 * block_size,
            dynamic: Some(Dynamic {
                block_size,
                bitmap_size: 512,
                max_table_entries: entries.len() as u32,
                table_offset: 0,
                bat: RwLock::new(bat),
                next: AtomicU64::new(0),
                last_bitmap: AtomicU64::new(u64::MAX),
            }),
        }
    }

    #[test]
    fn lookup_maps_blocks_and_runs_of_holes() {
        let free = UNALLOCATED;
        let l = dynamic(&[8, free, free, 3, free], 4096);
        assert_eq!(
            l.lookup(&super::super::tests_null(), 100, 1 << 20).unwrap(),
            (
                Where::Data {
                    file: 0,
                    host: 8 * 512 + 512 + 100,
                    recurse: false
                },
                4096 - 100
            )
        );
        // Holes run on to the next allocated block, within the request.
        assert_eq!(
            l.lookup(&super::super::tests_null(), 4097, 1 << 20)
                .unwrap(),
            (Where::Zero, 2 * 4096 - 1)
        );
        assert_eq!(
            l.lookup(&super::super::tests_null(), 4097, 5000).unwrap(),
            (Where::Zero, 5000)
        );
        assert_eq!(
            l.lookup(&super::super::tests_null(), 4 * 4096, 4096)
                .unwrap(),
            (Where::Zero, 4096)
        );
        assert_eq!(
            l.lookup(&super::super::tests_null(), 3 * 4096, 4096)
                .unwrap()
                .0,
            Where::Data {
                file: 0,
                host: 3 * 512 + 512,
                recurse: false
            }
        );
        assert_eq!(l.cluster_size(), Some(4096));
    }
}
