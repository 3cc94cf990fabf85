//! Creating VHD images and writing into them, as QEMU's vpc driver does
//! (`vpc_co_create`, `alloc_block`, `get_image_offset`).
//!
//! - Create: the size is rounded up to a sector, then (without
//!   `force_size`) up to a whole cylinder of the CHS geometry the VHD
//!   specification derives from it, unless that geometry is the largest;
//!   QEMU's creator application is `qemu`, or `qem2` with `force_size`
//!   (which tells readers the current size counts, not the geometry).
//!   A dynamic disk is the footer, the dynamic header, a BAT of 0xff, and
//!   the footer again; a fixed disk a sparse file with the footer last.
//! - Write: a new block of a dynamic disk goes where the footer is: its
//!   sector bitmap (all ones) and data, then the footer moved past it,
//!   then the BAT entry, so a reader never finds the entry before the
//!   data. The first write into an existing block sets its bitmap to all
//!   ones, as QEMU does (it never tracks sectors). Blocks lie in the
//!   order they are first written.

use std::sync::atomic::Ordering;

use super::{at, dyn_at, Dynamic, Footer, VpcLayout, COOKIE, DYN_COOKIE, DYN_HEADER_LEN};
use super::{FOOTER_LEN, MAX_GEOMETRY, MAX_SECTORS, SECTOR, TYPE_FIXED, UNALLOCATED};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// The unit a fixed disk's writes are split in (no allocation happens).
pub(super) const FIXED_UNIT: u64 = 2 << 20;
/// The block size QEMU creates dynamic disks with.
const BLOCK_SIZE: u64 = 2 << 20;
const TYPE_DYNAMIC: u32 = 3;
/// Seconds from the Unix epoch to the VHD one (2000-01-01 00:00 UTC).
const VHD_EPOCH: u64 = 946_684_800;
/// Where QEMU puts the BAT of a disk it creates (after the header).
const TABLE_OFFSET: u64 = (FOOTER_LEN + DYN_HEADER_LEN) as u64;

/// The `subformat` create option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Subformat {
    #[default]
    Dynamic,
    Fixed,
}

impl Subformat {
    /// The option's value (None: not given), refused in QEMU's words.
    pub fn parse(v: Option<&str>) -> Result<Subformat> {
        match v {
            None | Some("dynamic") => Ok(Subformat::Dynamic),
            Some("fixed") => Ok(Subformat::Fixed),
            Some(v) => Err(Error::Format(format!(
                "Parameter 'subformat' does not accept value '{v}'"
            ))),
        }
    }
}

/// The VHD specification's geometry of `ts` sectors (appendix "CHS
/// calculation"): cylinders, heads, sectors per track, rounding down.
fn chs(ts: u64) -> (u64, u64, u64) {
    let ts = ts.min(MAX_GEOMETRY);
    let (mut s, mut h, mut cth);
    if ts >= 65535 * 16 * 63 {
        s = 255;
        h = 16;
        cth = ts / s;
    } else {
        s = 17;
        cth = ts / s;
        h = cth.div_ceil(1024).max(4);
        if cth >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            cth = ts / s;
        }
        if cth >= h * 1024 {
            s = 63;
            h = 16;
            cth = ts / s;
        }
    }
    (cth / h, h, s)
}

/// The sectors and geometry of a new disk of `size` bytes (whole
/// sectors): the smallest geometry that holds them, whose sectors count,
/// unless `force_size` or the geometry is the largest (then `size`).
fn geometry_for(size: u64, force_size: bool) -> (u64, (u64, u64, u64)) {
    let sectors = size / SECTOR;
    if force_size {
        return (sectors, (65535, 16, 255));
    }
    let ts = sectors.min(MAX_GEOMETRY);
    let mut g = (0, 0, 0);
    let mut i = 0;
    // Each step grows the count by a sector: at most a cylinder's worth.
    while ts > g.0 * g.1 * g.2 {
        g = chs(ts + i);
        i += 1;
    }
    match g.0 * g.1 * g.2 {
        MAX_GEOMETRY => (sectors, g),
        n => (n, g),
    }
}

/// The one's complement of the byte sum of `b` with its checksum field
/// at `at` taken as zero.
fn checksum(b: &[u8], at: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(x as u32));
    !sum
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A new disk's footer.
fn new_footer(
    sectors: u64,
    (c, h, s): (u64, u64, u64),
    sub: Subformat,
    force_size: bool,
) -> Result<[u8; FOOTER_LEN]> {
    let mut b = [0u8; FOOTER_LEN];
    b[..8].copy_from_slice(COOKIE);
    put32(&mut b, at::FEATURES, 2);
    put32(&mut b, at::VERSION, 0x0001_0000);
    let data_offset = match sub {
        Subformat::Fixed => u64::MAX,
        Subformat::Dynamic => FOOTER_LEN as u64,
    };
    put64(&mut b, at::DATA_OFFSET, data_offset);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // A u32 of seconds, as QEMU stores it (it wraps in 2136).
    put32(&mut b, at::TIMESTAMP, now.saturating_sub(VHD_EPOCH) as u32);
    let app: &[u8; 4] = if force_size { b"qem2" } else { b"qemu" };
    b[at::CREATOR_APP..at::CREATOR_APP + 4].copy_from_slice(app);
    // Virtual PC 2007 (5.3) on Windows, as QEMU says.
    put32(&mut b, at::CREATOR_VERSION, 0x0005_0003);
    b[at::CREATOR_OS..at::CREATOR_OS + 4].copy_from_slice(b"Wi2k");
    put64(&mut b, at::ORIG_SIZE, sectors * SECTOR);
    put64(&mut b, at::CURRENT_SIZE, sectors * SECTOR);
    // Within range: the geometry is at most 65535/16/255.
    b[at::CYLINDERS..at::CYLINDERS + 2].copy_from_slice(&(c as u16).to_be_bytes());
    b[at::HEADS] = h as u8;
    b[at::SECTORS] = s as u8;
    let disk_type = match sub {
        Subformat::Fixed => TYPE_FIXED,
        Subformat::Dynamic => TYPE_DYNAMIC,
    };
    put32(&mut b, at::DISK_TYPE, disk_type);
    let uuid = &mut b[at::UUID..at::UUID + 16];
    crate::crypto::random_bytes(uuid)?;
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let sum = Footer::checksum(&b);
    put32(&mut b, at::CHECKSUM, sum);
    Ok(b)
}

/// Writes a new VHD image of `size` bytes into the empty file `st`, as
/// `qemu-img create -f vpc` does; `subformat` and `force_size` are the
/// create options (the subformat is judged here, once the file exists,
/// as QEMU judges it).
pub fn create(st: &Storage, size: u64, subformat: Option<&str>, force_size: bool) -> Result<()> {
    let sub = Subformat::parse(subformat)?;
    let size = size
        .checked_next_multiple_of(SECTOR)
        .ok_or_else(|| Error::TooLarge(format!("virtual size {size}")))?;
    let (sectors, geometry) = geometry_for(size, force_size);
    if sectors > MAX_SECTORS {
        return Err(Error::TooLarge(format!("virtual size {size}")));
    }
    let footer = new_footer(sectors, geometry, sub, force_size)?;
    if sub == Subformat::Fixed {
        let end = sectors * SECTOR;
        st.set_len(end + FOOTER_LEN as u64)?;
        return st.write_at(&footer, end);
    }
    let entries = sectors.div_ceil(BLOCK_SIZE / SECTOR);
    let bat_len = (entries * 4).next_multiple_of(SECTOR);
    let mut h = [0u8; DYN_HEADER_LEN];
    h[..8].copy_from_slice(DYN_COOKIE);
    put64(&mut h, dyn_at::DATA_OFFSET, u64::MAX);
    put64(&mut h, dyn_at::TABLE_OFFSET, TABLE_OFFSET);
    put32(&mut h, dyn_at::VERSION, 0x0001_0000);
    // At most 2040 GiB / 2 MiB entries.
    put32(&mut h, dyn_at::MAX_TABLE_ENTRIES, entries as u32);
    put32(&mut h, dyn_at::BLOCK_SIZE, BLOCK_SIZE as u32);
    let sum = checksum(&h, dyn_at::CHECKSUM);
    put32(&mut h, dyn_at::CHECKSUM, sum);
    st.write_at(&footer, 0)?;
    st.write_at(&h, FOOTER_LEN as u64)?;
    // At most 4 MiB, padding sectors included (0xff too, as QEMU's).
    st.write_at(&vec![0xff; bat_len as usize], TABLE_OFFSET)?;
    st.write_at(&footer, TABLE_OFFSET + bat_len)
}

/// Sets the sector bitmap of allocated `block` to all ones before a
/// write into it, unless it was the last block so marked.
pub(super) fn mark_block(d: &Dynamic, st: &Storage, block: u64) -> Result<()> {
    if d.last_bitmap.load(Ordering::Relaxed) == block {
        return Ok(());
    }
    let e = d.entry(block);
    if e == UNALLOCATED {
        return Ok(());
    }
    // The bitmap of a block of at most 2^31 bytes: at most 512 KiB.
    st.write_at(&vec![0xff; d.bitmap_size as usize], e as u64 * SECTOR)?;
    d.last_bitmap.store(block, Ordering::Relaxed);
    Ok(())
}

/// Stores block `index` of a dynamic disk (`data`, one block) where the
/// footer is, moves the footer past it, then records it in the BAT.
pub(super) fn allocate(
    l: &VpcLayout,
    st: &Storage,
    index: u64,
    data: &[u8],
    written: std::ops::Range<usize>,
) -> Result<()> {
    let Some(d) = &l.dynamic else {
        return Err(Error::Format(
            "a fixed VHD has no blocks to allocate".into(),
        ));
    };
    let at = d.next.load(Ordering::Relaxed);
    let data_at = at + d.bitmap_size;
    let end = data_at + d.block_size;
    let sector = at / SECTOR;
    // A hostile header can place the next block over the footer copy,
    // the dynamic header or the BAT, which QEMU would overwrite: refused.
    let taken = [
        (0, FOOTER_LEN as u64),
        (l.footer.data_offset, DYN_HEADER_LEN as u64),
        (d.table_offset, d.max_table_entries as u64 * 4),
    ];
    let overlaps = taken
        .iter()
        .any(|&(s, n)| s < end + FOOTER_LEN as u64 && at < s.saturating_add(n));
    if overlaps || sector >= UNALLOCATED as u64 || !at.is_multiple_of(SECTOR) {
        return Err(Error::Format(format!(
            "VHD image's next block (at {at:#x}) would overlap its metadata"
        )));
    }
    let file_len = st.len()?;
    st.write_at(&vec![0xff; d.bitmap_size as usize], at)?;
    if file_len > at + FOOTER_LEN as u64 {
        // Bytes past the old footer would show through holes (QEMU shows
        // them): the block is written whole.
        st.write_at(data, data_at)?;
    } else {
        // Past the old end of the file holes read as zeros: only what
        // was written is, as QEMU writes it.
        let from = written.start;
        st.write_at(&data[written], data_at + from as u64)?;
    }
    st.write_at(&l.footer_bytes, end)?;
    st.write_at(&(sector as u32).to_be_bytes(), d.table_offset + index * 4)?;
    let mut bat = d.bat.write().unwrap_or_else(|e| e.into_inner());
    bat.set_u32_be(index, sector as u32);
    d.next.store(end, Ordering::Relaxed);
    d.last_bitmap.store(index, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_rounds_up_to_a_cylinder_as_qemu() {
        // Sizes and virtual sizes qemu-img create gives (checked with
        // qemu-img 10.0.2 info).
        for (size, want) in [
            (0, 0),
            (512, 34816),
            (1 << 20, 1079296),
            (10 << 20, 10514432),
            (100 << 20, 104865792),
            (1 << 30, 1073995776),
            (127u64 << 30, 136365219840),
        ] {
            let (sectors, _) = geometry_for(size, false);
            assert_eq!(sectors * SECTOR, want, "size {size}");
        }
        assert_eq!(geometry_for(1 << 30, false).1, (2081, 16, 63));
        assert_eq!(geometry_for(10 << 20, false).1, (302, 4, 17));
        // The largest geometry and beyond: the size itself.
        let big = MAX_GEOMETRY * SECTOR + 4096;
        assert_eq!(geometry_for(big, false), (big / SECTOR, (65535, 16, 255)));
        assert_eq!(geometry_for(1024, true), (2, (65535, 16, 255)));
    }

    #[test]
    fn subformats_are_judged_in_qemu_words() {
        assert_eq!(Subformat::parse(None).unwrap(), Subformat::Dynamic);
        assert_eq!(Subformat::parse(Some("fixed")).unwrap(), Subformat::Fixed);
        assert_eq!(
            Subformat::parse(Some("Fixed")).unwrap_err().to_string(),
            "Parameter 'subformat' does not accept value 'Fixed'"
        );
    }
}
