//! Persistent dirty bitmaps (qcow2.rst, "Bitmaps extension", "Bitmaps"):
//! the header extension, the bitmap directory and the bitmap tables,
//! parsed and bounded as QEMU bounds them.
//!
//! An image's bitmaps count only while the autoclear bit `BITMAPS` is set:
//! a program that does not know them clears it when it writes, and the
//! extension is then ignored (QEMU drops it at the next header update and
//! its clusters are leaks). Keeping the bitmaps right while the image is
//! written is in [`track`].

pub mod edit;
pub mod limits;
mod read;
pub mod track;
mod words;

pub use limits::*;

use crate::header::{autoclear, ext, Header};

/// Size of the header extension's data.
pub const EXT_LEN: usize = 24;
/// Fixed part of a directory entry (name and extra data follow).
const ENTRY_FIXED: usize = 24;
/// The one bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;

/// Bitmap directory entry flags.
pub mod flags {
    /// The bitmap was being changed by a program that has not stored it
    /// yet: its content is inconsistent.
    pub const IN_USE: u32 = 1 << 0;
    /// The bitmap tracks every write (an enabled bitmap).
    pub const AUTO: u32 = 1 << 1;
    /// Bit 2 (extra data compatible) and above: unknown to QEMU.
    pub const RESERVED: u32 = 0xffff_fffc;
}

/// Bitmap table entry layout.
pub mod entry {
    pub const RESERVED: u64 = 0xff00_0000_0000_01fe;
    pub const OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
    /// With offset 0: the cluster of bitmap data reads as all ones.
    pub const ALL_ONES: u64 = 1;
}

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

impl BitmapsExt {
    /// Parses and bounds the extension's data.
    pub fn parse(data: &[u8], cluster_size: u64) -> Result<BitmapsExt, BitmapError> {
        if data.len() != EXT_LEN {
            return Err(BitmapError::ExtLength(data.len()));
        }
        if be32(data, 4) != 0 {
            return Err(BitmapError::ExtReserved);
        }
        let e = BitmapsExt {
            nb_bitmaps: be32(data, 0),
            directory_size: be64(data, 8),
            directory_offset: be64(data, 16),
        };
        if e.nb_bitmaps > MAX_BITMAPS {
            return Err(BitmapError::TooMany(e.nb_bitmaps));
        }
        if e.nb_bitmaps == 0 {
            return Err(BitmapError::NoBitmaps);
        }
        if !e.directory_offset.is_multiple_of(cluster_size) {
            return Err(BitmapError::DirectoryOffset(e.directory_offset));
        }
        if e.directory_size > MAX_DIRECTORY_SIZE {
            return Err(BitmapError::DirectoryTooBig(e.directory_size));
        }
        Ok(e)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(EXT_LEN);
        b.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&self.directory_size.to_be_bytes());
        b.extend_from_slice(&self.directory_offset.to_be_bytes());
        b
    }

    /// The extension of `h`, if it counts: present, and the autoclear bit
    /// says the last writer kept the bitmaps (always unset in version 2).
    pub fn from_header(h: &Header) -> Result<Option<BitmapsExt>, BitmapError> {
        if !has_valid_bit(h) {
            return Ok(None);
        }
        match h.other_extensions.iter().find(|e| e.kind == ext::BITMAPS) {
            Some(e) => BitmapsExt::parse(&e.data, h.cluster_size()).map(Some),
            None => Ok(None),
        }
    }

    /// Replaces (or with None, removes) the extension in `h`, with the
    /// autoclear bit that goes with it.
    pub fn install(h: &mut Header, e: Option<BitmapsExt>) {
        h.other_extensions.retain(|x| x.kind != ext::BITMAPS);
        match e {
            Some(e) => {
                h.other_extensions.push(crate::header::Extension {
                    kind: ext::BITMAPS,
                    data: e.encode(),
                });
                h.autoclear_features |= autoclear::BITMAPS;
            }
            None => h.autoclear_features &= !autoclear::BITMAPS,
        }
    }
}

/// The autoclear bits a writable open keeps for bitmaps: the bitmaps bit
/// when the extension holds. A broken extension refuses the open, repairs
/// included (as in QEMU; every open checks it first, see
/// [`track::validate`]).
pub fn autoclear_to_keep(h: &Header) -> crate::error::Result<u64> {
    match BitmapsExt::from_header(h) {
        Ok(Some(_)) => Ok(autoclear::BITMAPS),
        Ok(None) => Ok(0),
        Err(e) => Err(crate::error::Error::Bitmap(e)),
    }
}

/// The header's autoclear bit for bitmaps is set (version 3 only).
pub fn has_valid_bit(h: &Header) -> bool {
    h.version >= 3 && h.autoclear_features & autoclear::BITMAPS != 0
}

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    pub flags: u32,
    pub granularity_bits: u8,
    /// The name as stored (QEMU names are UTF-8; kept as bytes so that an
    /// entry is written back unchanged).
    pub name: Vec<u8>,
}

impl DirEntry {
    pub fn name_str(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }
    pub fn in_use(&self) -> bool {
        self.flags & flags::IN_USE != 0
    }
    pub fn auto(&self) -> bool {
        self.flags & flags::AUTO != 0
    }
    pub(crate) fn encoded_len(&self) -> usize {
        (ENTRY_FIXED + self.name.len()).next_multiple_of(8)
    }

    /// QEMU's constraints on an entry of an image of `virtual_size` bytes.
    fn satisfies_constraints(&self, type_: u8, cluster_size: u64, virtual_size: u64) -> bool {
        let ok = self.table_size != 0
            && self.table_offset != 0
            && self.table_offset.is_multiple_of(cluster_size)
            && self.table_size <= MAX_TABLE_SIZE
            && (MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits)
            && self.flags & flags::RESERVED == 0
            && self.name.len() <= MAX_NAME_SIZE
            && type_ == TYPE_DIRTY_TRACKING;
        if !ok {
            return false;
        }
        let phys = self.table_size as u64 * cluster_size;
        if phys > MAX_PHYS_SIZE {
            return false;
        }
        // A consistent bitmap must cover the whole disk; one in use may
        // be stale from before a resize.
        self.in_use() || virtual_size <= (phys * 8) << self.granularity_bits
    }
}

/// Bytes of bitmap data for a disk of `size` bytes at this granularity.
pub fn data_bytes(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1 << granularity_bits).div_ceil(8)
}

/// Bitmap table entries for a disk of `size` bytes.
pub fn table_size_for(size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    data_bytes(size, granularity_bits).div_ceil(cluster_size)
}

/// Parses and checks the bitmap directory `buf` (`ext.directory_size`
/// bytes read from the file) of an image of `virtual_size` bytes.
pub fn parse_directory(
    buf: &[u8],
    e: &BitmapsExt,
    cluster_size: u64,
    virtual_size: u64,
) -> Result<Vec<DirEntry>, BitmapError> {
    if e.directory_size == 0 {
        return Err(BitmapError::DirectoryEmpty);
    }
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < buf.len() {
        if at + ENTRY_FIXED > buf.len() {
            return Err(BitmapError::BrokenDirectory);
        }
        if out.len() as u32 >= e.nb_bitmaps {
            return Err(BitmapError::MoreThanHeader);
        }
        let name_size = u16::from_be_bytes([buf[at + 18], buf[at + 19]]) as usize;
        let extra = be32(buf, at + 20) as usize;
        let len = (ENTRY_FIXED + name_size + extra).next_multiple_of(8);
        if at + len > buf.len() {
            return Err(BitmapError::BrokenDirectory);
        }
        if extra != 0 {
            return Err(BitmapError::ExtraData);
        }
        let d = DirEntry {
            table_offset: be64(buf, at),
            table_size: be32(buf, at + 8),
            flags: be32(buf, at + 12),
            granularity_bits: buf[at + 17],
            name: buf[at + ENTRY_FIXED..at + ENTRY_FIXED + name_size].to_vec(),
        };
        if !d.satisfies_constraints(buf[at + 16], cluster_size, virtual_size) {
            return Err(BitmapError::Constraints(d.name_str()));
        }
        out.push(d);
        at += len;
    }
    if out.len() as u32 != e.nb_bitmaps {
        return Err(BitmapError::FewerThanHeader);
    }
    Ok(out)
}

/// Serialises a directory (entries 8-byte aligned, no extra data).
pub fn encode_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut b = Vec::new();
    for d in entries {
        let start = b.len();
        b.extend_from_slice(&d.table_offset.to_be_bytes());
        b.extend_from_slice(&d.table_size.to_be_bytes());
        b.extend_from_slice(&d.flags.to_be_bytes());
        b.push(TYPE_DIRTY_TRACKING);
        b.push(d.granularity_bits);
        b.extend_from_slice(&(d.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&d.name);
        b.resize(start + d.encoded_len(), 0);
    }
    b
}

/// Checks one bitmap table entry (reserved bits clear; a data cluster
/// offset aligned, and then no all-ones flag).
pub fn check_table_entry(e: u64, cluster_size: u64) -> bool {
    if e & entry::RESERVED != 0 {
        return false;
    }
    let off = e & entry::OFFSET;
    off == 0 || (e & entry::ALL_ONES == 0 && off.is_multiple_of(cluster_size))
}

/// Decodes a bitmap table read from the file, checking every entry.
pub fn parse_table(buf: &[u8], d: &DirEntry, cluster_size: u64) -> Result<Vec<u64>, BitmapError> {
    let t: Vec<u64> = buf.chunks_exact(8).map(|c| be64(c, 0)).collect();
    for (index, &e) in t.iter().enumerate() {
        if !check_table_entry(e, cluster_size) {
            return Err(BitmapError::TableEntry {
                name: d.name_str(),
                index,
                entry: e,
            });
        }
    }
    Ok(t)
}

/// The name and granularity rules `qemu-img bitmap --add` applies.
pub fn check_new_bitmap(
    name: &str,
    granularity: u64,
    virtual_size: u64,
    cluster_size: u64,
) -> Result<(), String> {
    let bits = granularity.trailing_zeros();
    if bits > MAX_GRANULARITY_BITS as u32 {
        return Err(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        ));
    }
    if bits < MIN_GRANULARITY_BITS as u32 {
        return Err(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << MIN_GRANULARITY_BITS
        ));
    }
    let bytes = data_bytes(virtual_size, bits as u8);
    if bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE as u64 * cluster_size {
        return Err("Too much space will be occupied by the bitmap. Use larger granularity".into());
    }
    if name.len() > MAX_NAME_SIZE {
        return Err(format!(
            "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
        ));
    }
    Ok(())
}

/// Bytes the bitmaps `list` of a disk of `disk_size` bytes take in an
/// image with `cluster_size` clusters, all data allocated (`qemu-img
/// measure`'s "bitmaps size"): data clusters, tables, the directory.
pub fn measure(list: &[DirEntry], disk_size: u64, cluster_size: u64) -> u64 {
    let mut total = 0;
    let mut dir = 0u64;
    for d in list {
        let clusters = data_bytes(disk_size, d.granularity_bits).div_ceil(cluster_size);
        total += clusters * cluster_size;
        total += (clusters * 8).next_multiple_of(cluster_size);
        dir += d.encoded_len() as u64;
    }
    total + dir.next_multiple_of(cluster_size)
}

#[cfg(test)]
mod tests;
