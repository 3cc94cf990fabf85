//! VMDK images, read-only, as QEMU's vmdk driver reads them: for now a
//! single sparse file (monolithicSparse, what `qemu-img create -f vmdk`
//! makes, and streamOptimized, with compressed grains: `stream.rs`).
//! Descriptor files naming extent files, and parents
//! (`parentFileNameHint`) are refused with a clear error, not read.
//!
//! Layout of a sparse extent (VMware's "Virtual Disk Format 5.0"; every
//! field little-endian, sizes and offsets in 512-byte sectors):
//! - a header at 0 (magic `KDMV`): capacity, grain size, the embedded
//!   text descriptor's place, grain table entries per table, where the
//!   grain directory (GD) and its redundant copy are, flags;
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
//! - the CID and parent CID are the first `CID` and `parentCID` found in
//!   the 10 KiB at 0x200 (where QEMU's monolithic descriptor is, whatever
//!   the header says), up to its first NUL byte;
//! - block status answers one grain at a time.

use super::table::Table;
use super::{ForeignImage, Layout, Where};
use crate::check::report::CheckReport;
use crate::error::{Error, Result};
use crate::image::Format;
use crate::storage::Storage;

/// A VMDK image.
pub type Vmdk = ForeignImage<VmdkLayout>;

/// The sparse extent magic, at 0 (a big-endian u32 for the probe).
pub const MAGIC: &[u8; 4] = b"KDMV";
/// The old VMFS sparse ("COWD") magic: QEMU reads it, rimg does not.
pub const MAGIC_COWD: &[u8; 4] = b"COWD";
const SECTOR: u64 = 512;
/// Bytes of the header QEMU reads (and of each footer sector).
pub const HEADER_LEN: usize = 512;
/// Flag bits.
pub const FLAG_RGD: u32 = 1 << 1;
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
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
/// Where the descriptor is searched for the CIDs, and how much of it.
const DESC_AT: u64 = 0x200;
const DESC_SIZE: usize = 20 * 512;
/// QEMU's largest offset (2^63 - 2^30) and request (2^31 - 512).
const MAX_OFFSET: u64 = (i64::MAX as u64) & !((1 << 30) - 1);
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

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn refuse(msg: impl Into<String>) -> Error {
    Error::Format(msg.into())
}

/// Whether QEMU's block layer reads `len` bytes at `off`.
fn readable(off: u64, len: u64) -> bool {
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

/// A monolithicSparse image's header, grain directory and CIDs.
#[derive(Debug)]
pub struct VmdkLayout {
    header: Header,
    /// Sectors one GD entry covers (GTEs per GT times the grain), at most
    /// 2^30.
    gd_entry_sectors: u64,
    /// GD entries, as QEMU counts them (its u32, wrapped): a lookup past
    /// them cannot say where the grain is.
    gd_entries: u32,
    /// The GD (u32 GT sectors); past the end of the file, zero.
    gd: Table,
    zero_grain: bool,
    cid: u32,
    parent_cid: u32,
    /// The last GT looked up: its sector (0: none) and bytes (at most
    /// 2 KiB). The image is read-only: a GT never changes.
    gt_cache: std::sync::Mutex<(u32, Vec<u8>)>,
    /// Grains are deflate-compressed (streamOptimized).
    compressed: bool,
    /// The last grain inflated whole: its host offset (0: none) and
    /// bytes (grains up to [`stream::CACHED_GRAIN`]).
    grain_cache: std::sync::Mutex<(u64, Vec<u8>)>,
}

/// Opens a VMDK image (read-only: a writable `st` is refused).
pub fn open(st: Storage) -> Result<Vmdk> {
    let layout = VmdkLayout::read(&st)?;
    ForeignImage::new(st, layout)
}

/// What rimg does not read yet, said plainly.
fn not_yet(what: &str) -> Error {
    refuse(format!("{what} are not supported by rimg yet"))
}

impl VmdkLayout {
    fn read(st: &Storage) -> Result<VmdkLayout> {
        // QEMU's block layer sees the file in whole sectors.
        let file_len = st.len()?.next_multiple_of(SECTOR);
        if file_len < 4 {
            return Err(refuse("File is too small, not a valid image"));
        }
        let mut b = [0u8; HEADER_LEN];
        st.read_at(&mut b, 0)?;
        if &b[..4] == MAGIC_COWD {
            return Err(not_yet("VMDK3 (COWD) sparse files"));
        }
        if &b[..4] != MAGIC {
            return Err(descriptor_refusal(st, 0, file_len));
        }
        let mut h = Header::parse(&b);
        if h.capacity == 0 && h.desc_offset != 0 {
            // The embedded descriptor stands for the file (QEMU's own
            // is monolithicSparse: refused by its type).
            let at = h.desc_offset.wrapping_mul(SECTOR);
            return Err(descriptor_refusal(st, at, file_len));
        }
        if h.gd_offset == GD_AT_END {
            // A stream as VMware writes it: the footer's header counts.
            h = stream::footer_header(st, file_len)?;
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
        if h.flags & FLAG_RGD != 0 && !readable(h.rgd_offset.wrapping_mul(SECTOR), gd_len) {
            // QEMU reads the copy too (and never uses it).
            return Err(refuse(format!(
                "Could not read l1 backup table from extent '{name}': Input/output error"
            )));
        }
        // The descriptor, for the CIDs and the parent's name.
        let mut desc = vec![0u8; DESC_SIZE];
        st.read_at(&mut desc, DESC_AT)?;
        let text = until_nul(&desc);
        if find(text, b"parentFileNameHint").is_some() {
            return Err(not_yet("VMDK images with a parent (parentFileNameHint)"));
        }
        let einval = || {
            refuse(format!(
                "Could not open '{}': Invalid argument",
                st.path().display()
            ))
        };
        let cid = cid_after(text, b"CID").ok_or_else(einval)?;
        let parent_cid = cid_after(text, b"parentCID").ok_or_else(einval)?;
        // capacity * 512 past QEMU's largest length (or u64): EFBIG from
        // the block layer once the driver has opened.
        match h.capacity.checked_mul(SECTOR) {
            Some(n) if n <= MAX_OFFSET => {}
            _ => {
                return Err(refuse(
                    "Could not refresh total sector count: File too large",
                ))
            }
        }
        let compressed = h.compression == COMPRESSION_DEFLATE;
        Ok(VmdkLayout {
            zero_grain: h.flags & FLAG_ZERO_GRAIN != 0,
            header: h,
            gd_entry_sectors,
            gd_entries,
            gd,
            cid,
            parent_cid,
            gt_cache: std::sync::Mutex::new((0, Vec::new())),
            compressed,
            grain_cache: std::sync::Mutex::new((0, Vec::new())),
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The descriptor's CID.
    pub fn cid(&self) -> u32 {
        self.cid
    }

    /// The descriptor's parentCID (0xffffffff: no parent).
    pub fn parent_cid(&self) -> u32 {
        self.parent_cid
    }

    /// qemu-img info's create type: the descriptor's is not read for a
    /// sparse file; compressed grains make it a stream, as in QEMU.
    pub fn create_type(&self) -> &'static str {
        if self.compressed {
            "streamOptimized"
        } else {
            "monolithicSparse"
        }
    }

    /// Whether grains are compressed (streamOptimized).
    pub fn compressed(&self) -> bool {
        self.compressed
    }

    fn grain_bytes(&self) -> u64 {
        self.header.grain * SECTOR
    }

    /// The GTE of the grain holding guest sector `sector`: None when the
    /// GD cannot say (QEMU's VMDK_ERROR), Some(0) when unallocated.
    fn gte(&self, st: &Storage, sector: u64) -> Result<Option<u32>> {
        let gd_index = sector / self.gd_entry_sectors;
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

    /// How the grain holding `sector` is stored, from its GTE.
    fn grain_at(&self, gte: Option<u32>) -> GrainAt {
        match gte {
            None => GrainAt::Broken,
            Some(0) => GrainAt::Unallocated,
            Some(GTE_ZEROED) if self.zero_grain => GrainAt::Zero,
            Some(s) => GrainAt::Data(s as u64 * SECTOR),
        }
    }

    /// qemu-img check: every grain's offset against the file's length;
    /// the first one past it (or a grain the GD cannot place) stops the
    /// check with its error, as QEMU's does. Each GT is read once and a
    /// missing one passed over whole: the answers are QEMU's, the work
    /// bounded by the GD.
    pub fn check(&self, st: &Storage) -> Result<CheckReport> {
        let mut rep = CheckReport::default();
        let mut fail = |message: String, errno: &str| {
            rep.messages.push(message);
            rep.failed = Some(errno.into());
            rep.corruptions += 1;
            Ok(std::mem::take(&mut rep))
        };
        let total = self.header.capacity;
        // QEMU's block layer: the file in whole sectors.
        let file_len = st.len()?.next_multiple_of(SECTOR);
        let grain = self.header.grain;
        let gtes = self.header.gtes_per_gt as u64;
        let mut gt = vec![0u8; gtes as usize * 4];
        let mut sector = 0u64;
        while sector < total {
            let gd_index = sector / self.gd_entry_sectors;
            if gd_index >= self.gd_entries as u64 {
                // QEMU's VMDK_ERROR (-1), read as an errno.
                return fail(
                    format!("ERROR: could not get cluster_offset for sector {sector}"),
                    "Operation not permitted",
                );
            }
            let end = ((gd_index + 1) * self.gd_entry_sectors).min(total);
            let gt_sector = self.gd.u32_le(gd_index);
            if gt_sector == 0 {
                sector += (end - sector).div_ceil(grain) * grain;
                continue;
            }
            st.read_at(&mut gt, gt_sector as u64 * SECTOR)?;
            while sector < end {
                let i = ((sector / grain) % gtes) as usize;
                let e = u32::from_le_bytes(gt[i * 4..i * 4 + 4].try_into().unwrap());
                if let GrainAt::Data(off) = self.grain_at(Some(e)) {
                    if off >= file_len {
                        return fail(
                            format!("ERROR: cluster offset for sector {sector} points after EOF"),
                            "Invalid argument",
                        );
                    }
                }
                sector += grain;
            }
        }
        Ok(rep)
    }
}

enum GrainAt {
    Broken,
    Unallocated,
    Zero,
    Data(u64),
}

/// The refusal of a text descriptor at `at` (a file that is not a sparse
/// extent, or a sparse file's embedded one), read as QEMU reads it (at
/// most 1 MiB - 1 bytes, the file's length): without a createType, or of
/// a type QEMU does not take from a descriptor, QEMU's words; of a type
/// it does, rimg does not read it yet (its extents are other files).
fn descriptor_refusal(st: &Storage, at: u64, file_len: u64) -> Error {
    let len = file_len.min((1 << 20) - 1);
    if !readable(at, len) {
        return refuse("Could not read from file: Input/output error");
    }
    let mut b = vec![0u8; len as usize];
    if let Err(e) = st.read_at(&mut b, at) {
        return e;
    }
    match create_type(until_nul(&b)) {
        None => refuse("invalid VMDK image descriptor"),
        Some(t) if !DESCRIPTOR_TYPES.contains(&t.as_slice()) => refuse(format!(
            "Unsupported image type '{}'",
            String::from_utf8_lossy(&t)
        )),
        Some(_) => not_yet("VMDK descriptor files (extents in other files)"),
    }
}

/// The create types QEMU opens from a text descriptor.
const DESCRIPTOR_TYPES: &[&[u8]] = &[
    b"monolithicFlat",
    b"vmfs",
    b"vmfsSparse",
    b"seSparse",
    b"twoGbMaxExtentSparse",
    b"twoGbMaxExtentFlat",
];

/// The value of the first `createType`, as QEMU finds it: two bytes
/// after the key (its `="`), up to the next `"`, at most 127 bytes.
fn create_type(text: &[u8]) -> Option<Vec<u8>> {
    let start = find(text, b"createType")? + b"createType".len() + 2;
    if start >= text.len() {
        return None;
    }
    let len = text[start..].iter().position(|&c| c == b'"')?;
    (len < 128).then(|| text[start..start + len].to_vec())
}

/// The bytes before the first NUL (a C string's).
fn until_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The hex number after the first `key` and one more byte (its `=`), as
/// QEMU's sscanf("%x") reads it: blanks skipped, a sign, an optional 0x,
/// at least one digit; too large saturates, as strtoul does.
fn cid_after(text: &[u8], key: &[u8]) -> Option<u32> {
    let start = find(text, key)? + key.len() + 1;
    let mut p = text.get(start..).unwrap_or(&[]);
    while let Some((c, rest)) = p.split_first() {
        if !c.is_ascii_whitespace() {
            break;
        }
        p = rest;
    }
    let neg = p.first() == Some(&b'-');
    if matches!(p.first(), Some(b'-' | b'+')) {
        p = &p[1..];
    }
    if p.len() > 2 && p[0] == b'0' && matches!(p[1], b'x' | b'X') && p[2].is_ascii_hexdigit() {
        p = &p[2..];
    }
    let digits = p.iter().take_while(|c| c.is_ascii_hexdigit()).count();
    if digits == 0 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in &p[..digits] {
        let d = (c as char).to_digit(16).unwrap() as u64;
        v = v
            .checked_mul(16)
            .and_then(|v| v.checked_add(d))
            .unwrap_or(u64::MAX);
        if v == u64::MAX {
            break;
        }
    }
    let v = if neg { v.wrapping_neg() } else { v };
    Some(v as u32)
}

impl Layout for VmdkLayout {
    fn format(&self) -> Format {
        Format::Vmdk
    }
    fn size(&self) -> u64 {
        self.header.capacity * SECTOR
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.grain_bytes())
    }
    fn lookup(&self, st: &Storage, off: u64, len: u64) -> Result<(Where, u64)> {
        let grain = self.grain_bytes();
        let in_grain = off % grain;
        let n = len.min(grain - in_grain);
        let w = match self.grain_at(self.gte(st, off / SECTOR)?) {
            GrainAt::Broken => Where::Broken,
            GrainAt::Unallocated => Where::Unallocated,
            GrainAt::Zero => Where::Zero,
            GrainAt::Data(host) if self.compressed => Where::Compressed {
                host,
                skip: in_grain,
            },
            GrainAt::Data(host) => Where::Data {
                host: host + in_grain,
                recurse: false,
            },
        };
        Ok((w, n))
    }
    fn read_compressed(&self, st: &Storage, host: u64, skip: u64, buf: &mut [u8]) -> Result<()> {
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

/// Whether `first` (the first bytes of a file, zero-padded) is a VMDK,
/// as QEMU's probe says: a sparse magic, or a text descriptor whose first
/// line that is neither a comment nor blank is `version=1|2|3`.
pub fn probe(first: &[u8]) -> bool {
    if first.len() < 4 {
        return false;
    }
    if &first[..4] == MAGIC || &first[..4] == MAGIC_COWD {
        return true;
    }
    let mut p = first;
    while let Some(&c) = p.first() {
        match c {
            b'#' => {
                let nl = p.iter().position(|&c| c == b'\n').unwrap_or(p.len());
                p = p.get(nl + 1..).unwrap_or(&[]);
            }
            b' ' => {
                let sp = p.iter().take_while(|&&c| c == b' ').count();
                p = &p[sp..];
                if p.first() == Some(&b'\r') {
                    p = &p[1..];
                }
                if p.first() != Some(&b'\n') {
                    return false;
                }
                p = &p[1..];
            }
            _ => {
                return [b"version=1", b"version=2", b"version=3"].iter().any(|v| {
                    p.starts_with(*v) && (p[9..].starts_with(b"\n") || p[9..].starts_with(b"\r\n"))
                });
            }
        }
    }
    false
}

mod stream;
#[cfg(test)]
mod tests;
