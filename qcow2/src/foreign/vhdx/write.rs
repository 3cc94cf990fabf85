//! Creating VHDX images and writing into them, as QEMU's vhdx driver
//! does (`vhdx_co_create`, `vhdx_user_visible_write`, `vhdx_co_writev`).
//!
//! - Create: the file identifier, both headers (the same but for the
//!   sequence number), the BAT (every payload entry ZERO unless
//!   `block_state_zero=off`), the region table twice, the metadata table
//!   and its items. The log region is never written: its GUID is zero,
//!   so every reader takes it as empty.
//! - Write: the first write of an open updates both headers, one after
//!   the other (MS-VHDX 2.2.2.1: a new sequence number and data write
//!   GUID before user-visible data changes). A new block goes at the end
//!   of the file rounded up to 1 MiB, only its written bytes (the rest
//!   of the block is a hole, which reads as zeros); then its BAT entry
//!   is written in place. QEMU writes that entry through its log and
//!   resets the log at once, which leaves the same BAT; rimg writes it
//!   directly (an aligned 8-byte write inside one sector does not tear),
//!   and qemu-img reads and checks such an image clean.

use std::sync::atomic::{AtomicBool, Ordering};

use super::meta::{self, le64, HEADERS, HEADER_CRC_LEN, HEADER_LEN, MIB, REGION_TABLE, TABLE_LEN};
use super::{VhdxLayout, FULLY_PRESENT, OFFSET_MASK, STATE_MASK};
use crate::error::{Error, Result};
use crate::foreign::crc32c::crc32c_without;
use crate::foreign::CreateOptions;
use crate::storage::Storage;

/// The largest disk QEMU creates.
const MAX_SIZE: u64 = 64 << 40;
const MAX_BLOCK: u64 = 256 * MIB;
/// A payload block that reads as zeros (QEMU's default for new images).
const PAYLOAD_ZERO: u64 = 2;
/// Where the metadata items start in the metadata region.
const ITEMS: u64 = 0x10000;

fn bad(msg: impl Into<String>) -> Error {
    Error::Format(msg.into())
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A random (version 4) GUID, stored as QEMU stores one.
fn new_guid() -> Result<[u8; 16]> {
    let mut g = [0u8; 16];
    crate::crypto::random_bytes(&mut g)?;
    g[6] = (g[6] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    Ok(g)
}

/// Sets a structure's CRC-32C (at byte 4, over the whole structure).
fn seal(b: &mut [u8]) {
    let c = crc32c_without(b, 4);
    put32(b, 4, c);
}

/// What a new image looks like, decided before anything is written.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    size: u64,
    log_size: u64,
    block_size: u64,
    /// log2 of the payload entries between sector bitmap entries.
    crb: u32,
    data_blocks: u32,
    bat_off: u64,
    bat_len: u64,
    md_off: u64,
    /// Where data begins: a new dynamic file's length.
    data_off: u64,
    fixed: bool,
    zero: bool,
}

/// The block size QEMU picks for a disk of `size` bytes.
fn auto_block_size(size: u64) -> u64 {
    match size {
        s if s <= 1 << 30 => 8 * MIB,
        s if s <= 100 << 30 => 16 * MIB,
        s if s <= 32 << 40 => 32 * MIB,
        _ => 64 * MIB,
    }
}

/// The options judged and rounded as QEMU does, in its order and words.
fn plan(size: u64, o: &CreateOptions) -> Result<Plan> {
    let fixed = match o.subformat.as_deref() {
        None | Some("dynamic") => false,
        Some("fixed") => true,
        Some(v) => {
            return Err(bad(format!(
                "Parameter 'subformat' does not accept value '{v}'"
            )))
        }
    };
    let size = size.checked_next_multiple_of(512).unwrap_or(u64::MAX);
    if size > MAX_SIZE {
        return Err(bad("Image size too large; max of 64TB"));
    }
    // Rounded up to whole MiB; a sum that wraps is 0, as in QEMU.
    let up = |v: u64| v.checked_next_multiple_of(MIB).unwrap_or(0);
    let log_size = o.log_size.map_or(MIB, up);
    if log_size > u32::MAX as u64 {
        return Err(bad("Log size must be smaller than 4 GB"));
    }
    if log_size == 0 {
        return Err(bad("Log size must be a multiple of 1 MB"));
    }
    let block_size = match o.block_size.map_or(0, up).min(MAX_BLOCK) {
        0 => auto_block_size(size),
        b => b,
    };
    if !block_size.is_power_of_two() {
        return Err(bad("Block size must be a power of two"));
    }
    let crb = ((1u64 << 32) / block_size).trailing_zeros();
    // QEMU's u32 counts: a disk of 0 bytes wraps to a large BAT.
    let data_blocks = size.div_ceil(block_size) as u32;
    let bat_entries = data_blocks.wrapping_add(data_blocks.wrapping_sub(1) >> crb);
    let bat_off = (MIB + log_size).next_multiple_of(MIB);
    let bat_len = (bat_entries as u64 * 8).next_multiple_of(MIB);
    let md_off = bat_off + bat_len;
    Ok(Plan {
        size,
        log_size,
        block_size,
        crb,
        data_blocks,
        bat_off,
        bat_len,
        md_off,
        data_off: md_off + 5 * MIB,
        fixed,
        zero: o.block_state_zero.unwrap_or(true),
    })
}

/// A header (MS-VHDX 2.2.2) of sequence number `seq`, its 4 KiB sealed.
fn header(seq: u64, file_guid: &[u8; 16], data_guid: &[u8; 16], log_size: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_CRC_LEN];
    h[..4].copy_from_slice(b"head");
    put64(&mut h, 8, seq);
    h[16..32].copy_from_slice(file_guid);
    h[32..48].copy_from_slice(data_guid);
    // Log GUID 0 (an empty log), log version 0, version 1.
    put16(&mut h, 66, 1);
    put32(&mut h, 68, log_size as u32);
    put64(&mut h, 72, MIB);
    seal(&mut h);
    h
}

/// The region table (MS-VHDX 2.2.3): the BAT and the metadata region.
fn region_table(p: &Plan) -> Vec<u8> {
    let mut t = vec![0u8; TABLE_LEN];
    t[..4].copy_from_slice(b"regi");
    put32(&mut t, 8, 2);
    let entries = [
        (meta::BAT_GUID, p.bat_off, p.bat_len),
        (meta::METADATA_GUID, p.md_off, MIB),
    ];
    for (i, (guid, off, len)) in entries.into_iter().enumerate() {
        let e = 16 + 32 * i;
        t[e..e + 16].copy_from_slice(&guid);
        put64(&mut t, e + 16, off);
        // At most 512 MiB (64 TiB in 1 MiB blocks); QEMU leaves the
        // "required" bit clear.
        put32(&mut t, e + 24, len as u32);
    }
    seal(&mut t);
    t
}

/// The metadata table (MS-VHDX 2.6.1) and its items, at `ITEMS` after it.
fn metadata(p: &Plan) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut t = vec![0u8; TABLE_LEN];
    t[..8].copy_from_slice(b"metadata");
    put16(&mut t, 10, 5);
    // (item, offset in the region, length, flags: 2 virtual disk, 4
    // required).
    let entries = [
        (meta::FILE_PARAMETERS, 0, 8, 4),
        (meta::VIRTUAL_DISK_SIZE, 8, 8, 6),
        (meta::PAGE83, 16, 16, 6),
        (meta::LOGICAL_SECTOR_SIZE, 32, 4, 6),
        (meta::PHYSICAL_SECTOR_SIZE, 36, 4, 6),
    ];
    for (i, (id, off, len, flags)) in entries.into_iter().enumerate() {
        let e = 32 + 32 * i;
        t[e..e + 16].copy_from_slice(&id);
        put32(&mut t, e + 16, ITEMS as u32 + off);
        put32(&mut t, e + 20, len);
        put32(&mut t, e + 24, flags);
    }
    let mut items = vec![0u8; 40];
    put32(&mut items, 0, p.block_size as u32);
    // A fixed disk keeps its blocks allocated (leave_blocks_allocated).
    put32(&mut items, 4, p.fixed as u32);
    put64(&mut items, 8, p.size);
    items[16..32].copy_from_slice(&new_guid()?);
    put32(&mut items, 32, 512);
    put32(&mut items, 36, 512);
    Ok((t, items))
}

/// Writes a new VHDX image of `size` bytes into the empty file `st`, as
/// `qemu-img create -f vhdx` does, with the options of `o` (judged here,
/// once the file exists, as QEMU judges them).
pub fn create(st: &Storage, size: u64, o: &CreateOptions) -> Result<()> {
    let p = plan(size, o)?;
    // The file identifier: the signature, then the creator in UTF-16LE.
    let mut id = b"vhdxfile".to_vec();
    let creator = format!("rimg v{}", env!("CARGO_PKG_VERSION"));
    id.extend(creator.encode_utf16().flat_map(u16::to_le_bytes));
    st.write_at(&id, 0)?;
    let (file_guid, data_guid) = (new_guid()?, new_guid()?);
    let mut seq = [0u8; 4];
    crate::crypto::random_bytes(&mut seq)?;
    let seq = u32::from_le_bytes(seq) as u64;
    for (k, at) in HEADERS.into_iter().enumerate() {
        let h = header(seq + k as u64, &file_guid, &data_guid, p.log_size);
        st.write_at(&h[..HEADER_LEN], at)?;
        st.sync()?;
    }
    let len = p.data_off + if p.fixed { p.size } else { 0 };
    match st.set_len(len) {
        Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EFBIG) => {
            return Err(bad("The image size is too large for file format 'vhdx'"))
        }
        r => r?,
    }
    if p.fixed || p.zero {
        let mut bat = vec![0u8; p.bat_len as usize];
        for b in 0..p.data_blocks as u64 {
            let idx = (b + (b >> p.crb)) as usize;
            let e = match p.zero {
                true => PAYLOAD_ZERO,
                false => (p.data_off + b * p.block_size) | FULLY_PRESENT,
            };
            put64(&mut bat, idx * 8, e);
        }
        st.write_at(&bat, p.bat_off)?;
    }
    let regions = region_table(&p);
    st.write_at(&regions, REGION_TABLE)?;
    st.write_at(&regions, REGION_TABLE + TABLE_LEN as u64)?;
    let (table, items) = metadata(&p)?;
    st.write_at(&table, p.md_off)?;
    st.write_at(&items, p.md_off + ITEMS)
}

/// The headers of an image open for writing, updated once per open
/// before its first write.
#[derive(Debug)]
pub(super) struct Headers {
    done: AtomicBool,
    /// Both headers' 4 KiB as on disk, and which one is in use.
    state: crate::sync::Mutex<([Vec<u8>; 2], usize)>,
}

impl Headers {
    pub(super) fn new(raw: [Vec<u8>; 2], current: usize) -> Headers {
        Headers {
            done: AtomicBool::new(false),
            state: crate::sync::Mutex::new((raw, current)),
        }
    }

    /// Before the first write of the open: twice, the header not in use
    /// becomes the one in use, with the next sequence number, this
    /// open's file write GUID and a new data write GUID, each synced
    /// before the next, so a crash leaves one valid header at any point.
    /// Concurrent writers wait until it is done.
    fn update(&self, st: &Storage) -> Result<()> {
        if self.done.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.done.load(Ordering::Acquire) {
            return Ok(());
        }
        let session = new_guid()?;
        for _ in 0..2 {
            let (raw, current) = &mut *s;
            let other = 1 - *current;
            let mut h = raw[other].clone();
            h[..HEADER_LEN].copy_from_slice(&raw[*current][..HEADER_LEN]);
            put64(&mut h, 8, le64(&raw[*current], 8).wrapping_add(1));
            h[16..32].copy_from_slice(&session);
            h[32..48].copy_from_slice(&new_guid()?);
            seal(&mut h);
            st.write_at(&h, HEADERS[other])?;
            st.sync()?;
            raw[other] = h;
            *current = other;
        }
        self.done.store(true, Ordering::Release);
        Ok(())
    }
}

impl VhdxLayout {
    /// Before guest bytes at `off` are written into a present block: the
    /// headers' update; a present block at offset 0 (which would write
    /// over the file's start) fails as QEMU fails it (EFAULT).
    pub(super) fn before_write(&self, st: &Storage, off: u64) -> Result<()> {
        self.headers_for_write()?.update(st)?;
        let raw = self.entry(self.index(off));
        if raw & STATE_MASK == FULLY_PRESENT && raw & OFFSET_MASK == 0 {
            return Err(Error::io(
                "write",
                std::io::Error::from_raw_os_error(libc::EFAULT),
            ));
        }
        Ok(())
    }

    fn headers_for_write(&self) -> Result<&Headers> {
        self.headers
            .as_ref()
            .ok_or_else(|| bad("VHDX image not open for writing"))
    }

    /// Stores `data`, the bytes of block `index` in `written` (the rest
    /// of the block reads as zeros), in a new block at the end of the
    /// file, then sets the block's BAT entry.
    pub(super) fn allocate(
        &self,
        st: &Storage,
        index: u64,
        data: &[u8],
        written: std::ops::Range<usize>,
    ) -> Result<()> {
        self.headers_for_write()?.update(st)?;
        let idx = self.index(index * self.block_size);
        if idx >= self.bat_slots {
            return Err(super::super::eio("write"));
        }
        let bs = self.block_size;
        let at = st.len()?.next_multiple_of(MIB).max(MIB);
        // A hostile header can place the regions past the end of the
        // file, where the new block would go: refused, as would be a
        // block past QEMU's largest offset.
        let clash = self.regions.iter().any(|r| r.overlaps(at, bs));
        if clash
            || at
                .checked_add(bs)
                .is_none_or(|e| e > super::super::MAX_OFFSET)
        {
            return Err(bad(format!(
                "VHDX image's next block (at {at:#x}) would overlap its metadata"
            )));
        }
        st.set_len(at + bs)?;
        st.write_at(data, at + written.start as u64)?;
        let entry = at | FULLY_PRESENT;
        st.write_at(&entry.to_le_bytes(), self.bat_offset + idx * 8)?;
        let mut bat = self.bat.write().unwrap_or_else(|e| e.into_inner());
        bat.set_u64_le(idx, entry);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(f: impl FnOnce(&mut CreateOptions)) -> CreateOptions {
        let mut o = CreateOptions::default();
        f(&mut o);
        o
    }

    #[test]
    fn plans_as_qemu_lays_out() {
        // Checked against qemu-img 10.0.2's images (vhdx-write notes).
        let p = plan(5 << 20, &CreateOptions::default()).unwrap();
        assert_eq!((p.bat_off, p.bat_len, p.md_off), (2 * MIB, MIB, 3 * MIB));
        assert_eq!((p.data_off, p.block_size), (8 * MIB, 8 * MIB));
        let p = plan(32 << 40, &CreateOptions::default()).unwrap();
        assert_eq!(
            (p.bat_off, p.md_off, p.data_off),
            (2 * MIB, 11 * MIB, 16 * MIB)
        );
        let p = plan(5 << 20, &opts(|o| o.log_size = Some(2 * MIB))).unwrap();
        assert_eq!((p.bat_off, p.data_off), (3 * MIB, 9 * MIB));
        // Size 0 wraps QEMU's u32 count to 0x7FFFFF entries.
        let p = plan(0, &CreateOptions::default()).unwrap();
        assert_eq!(p.data_off, 74448896);
        for (given, want) in [(1, MIB), (1536 << 10, 2 * MIB), (512 * MIB, MAX_BLOCK)] {
            let p = plan(5 << 20, &opts(|o| o.block_size = Some(given))).unwrap();
            assert_eq!(p.block_size, want, "{given}");
        }
        // 18446744073708503041: rounding up wraps to 0, which is auto.
        let p = plan(5 << 20, &opts(|o| o.block_size = Some(u64::MAX - MIB + 2))).unwrap();
        assert_eq!(p.block_size, 8 * MIB);
        assert_eq!(
            plan((1 << 30) + 512, &CreateOptions::default())
                .unwrap()
                .block_size,
            16 * MIB
        );
    }

    #[test]
    fn refusals_are_qemu_words_in_qemu_order() {
        let err = |size, o: CreateOptions| plan(size, &o).unwrap_err().to_string();
        assert_eq!(
            err(65 << 40, opts(|o| o.subformat = Some("Fixed".into()))),
            "Parameter 'subformat' does not accept value 'Fixed'"
        );
        assert_eq!(
            err((64 << 40) + 1, opts(|o| o.log_size = Some(0))),
            "Image size too large; max of 64TB"
        );
        assert_eq!(
            err(0, opts(|o| o.log_size = Some(4 << 30))),
            "Log size must be smaller than 4 GB"
        );
        assert_eq!(
            err(0, opts(|o| o.log_size = Some(0))),
            "Log size must be a multiple of 1 MB"
        );
        assert_eq!(
            err(0, opts(|o| o.block_size = Some(3 * MIB))),
            "Block size must be a power of two"
        );
        assert!(plan(64 << 40, &opts(|o| o.log_size = Some(4095 * MIB))).is_ok());
    }
}
