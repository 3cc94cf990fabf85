//! VirtualBox VDI images (version 1.1), as QEMU's vdi driver reads,
//! creates and writes them.
//!
//! Layout (VirtualBox's VDI header, `VDIPREHEADER` + `VDIHEADER1`, as
//! QEMU's `VdiHeader` lays it out; all fields little-endian): a 512-byte
//! header at offset 0, a block map of one u32 per 1 MiB guest block at
//! the header's block-map offset, and the data blocks from the header's
//! data offset on. Map entry `e` of guest block `b` puts the block's data
//! at `data offset + e * 1 MiB`; entries 0xffffffff (never allocated) and
//! 0xfffffffe (discarded) read as zeros. Nothing bounds `e` by the file
//! or by the block count: data past the end of the file reads as zeros,
//! and `check` reports entries that are out of range or used twice.
//!
//! A static image has every block allocated up front; its unwritten
//! parts are holes of the file, which block status reports as zeros
//! through the file ([`Where::Data`]'s `recurse`), as QEMU does.
//!
//! Opening validates the header in QEMU's order with QEMU's messages
//! (qemu-img prints them after `Could not open 'F': `).
//!
//! Writing allocates whole blocks at the end of the data area, in QEMU's
//! order: the block, then the header's allocated count, then the map
//! sector. A crash in between leaves a block counted but unmapped (check
//! reports the count), never a mapped block the next allocation reuses.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::RwLock;

use super::table::Table;
use super::{ForeignImage, Layout, Where};
use crate::check::report::CheckReport;
use crate::error::{Error, Result};
use crate::image::Format;
use crate::storage::Storage;

/// A VDI image.
pub type Vdi = ForeignImage<VdiLayout>;

/// Bytes of the header.
pub const HEADER_LEN: usize = 512;
/// Where the signature lies: after the 64-byte text ("<<< ... >>>\n",
/// never checked).
pub const SIGNATURE_AT: usize = 0x40;
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1 (major in the high half), the only one read.
const VERSION_1_1: u32 = 0x0001_0001;
/// Image type 2: static (fully allocated at creation); 1 is dynamic.
const TYPE_STATIC: u32 = 2;
/// The only block size read (QEMU's too).
pub const BLOCK_SIZE: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// Most blocks: QEMU reads the block map in one request of whole
/// sectors, which must stay below 2 GiB.
pub const MAX_BLOCKS: u32 = (((1u64 << 31) - SECTOR) / 4) as u32;
/// The largest disk the largest block map can hold.
pub const MAX_DISK_SIZE: u64 = MAX_BLOCKS as u64 * BLOCK_SIZE;
/// Map entries from here on mean "no data": 0xfffffffe (discarded) and
/// 0xffffffff (never allocated).
const FIRST_FREE_ENTRY: u32 = 0xffff_fffe;

/// Header field offsets (VDIHEADER1 after the 72-byte pre-header).
mod at {
    pub const VERSION: usize = 0x44;
    pub const HEADER_SIZE: usize = 0x48;
    pub const IMAGE_TYPE: usize = 0x4c;
    pub const OFFSET_BMAP: usize = 0x154;
    pub const OFFSET_DATA: usize = 0x158;
    pub const SECTOR_SIZE: usize = 0x168;
    pub const DISK_SIZE: usize = 0x170;
    pub const BLOCK_SIZE: usize = 0x178;
    pub const BLOCKS_IN_IMAGE: usize = 0x180;
    pub const BLOCKS_ALLOCATED: usize = 0x184;
    pub const UUID_IMAGE: usize = 0x188;
    pub const UUID_LAST_SNAP: usize = 0x198;
    /// 16-byte UUIDs: this image's, the last snapshot's, then these two
    /// (differencing images), which must be null.
    pub const UUID_LINK: usize = 0x1a8;
    pub const UUID_PARENT: usize = 0x1b8;
}

/// The header fields rimg uses, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Virtual size, rounded up to a sector.
    pub disk_size: u64,
    pub is_static: bool,
    pub offset_bmap: u32,
    pub offset_data: u32,
    pub blocks_in_image: u32,
    pub blocks_allocated: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn unsupported(what: String) -> Error {
    Error::Format(format!("unsupported VDI image ({what})"))
}

impl Header {
    /// Parses and validates the header, refusing what QEMU refuses, in
    /// its order and with its words.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header> {
        let mut disk_size =
            u64::from_le_bytes(b[at::DISK_SIZE..at::DISK_SIZE + 8].try_into().unwrap());
        if disk_size > MAX_DISK_SIZE {
            return Err(Error::Format(format!(
                "Unsupported VDI image size (size is {disk_size:#x}, max supported is {MAX_DISK_SIZE:#x})"
            )));
        }
        // VirtualBox's convertfromraw writes sizes that are not whole
        // sectors; QEMU rounds them up (cannot overflow: checked above).
        disk_size = disk_size.next_multiple_of(SECTOR);
        let signature = le32(b, SIGNATURE_AT);
        let version = le32(b, at::VERSION);
        let offset_bmap = le32(b, at::OFFSET_BMAP);
        let offset_data = le32(b, at::OFFSET_DATA);
        let sector_size = le32(b, at::SECTOR_SIZE);
        let block_size = le32(b, at::BLOCK_SIZE);
        let blocks_in_image = le32(b, at::BLOCKS_IN_IMAGE);
        let room = blocks_in_image as u64 * block_size as u64;
        let null = |at: usize| b[at..at + 16].iter().all(|&x| x == 0);
        if signature != SIGNATURE {
            return Err(Error::Format(format!(
                "Image not in VDI format (bad signature {signature:08x})"
            )));
        }
        if version != VERSION_1_1 {
            return Err(unsupported(format!(
                "version {}.{}",
                version >> 16,
                version & 0xffff
            )));
        }
        if !(offset_bmap as u64).is_multiple_of(SECTOR) {
            return Err(unsupported(format!(
                "unaligned block map offset {offset_bmap:#x}"
            )));
        }
        if !(offset_data as u64).is_multiple_of(SECTOR) {
            return Err(unsupported(format!(
                "unaligned data offset {offset_data:#x}"
            )));
        }
        if sector_size as u64 != SECTOR {
            return Err(unsupported(format!(
                "sector size {sector_size} is not {SECTOR}"
            )));
        }
        if block_size as u64 != BLOCK_SIZE {
            return Err(unsupported(format!(
                "block size {block_size} is not {BLOCK_SIZE}"
            )));
        }
        if disk_size > room {
            return Err(unsupported(format!(
                "disk size {disk_size}, image bitmap has room for {room}"
            )));
        }
        if !null(at::UUID_LINK) {
            return Err(unsupported("non-NULL link UUID".into()));
        }
        if !null(at::UUID_PARENT) {
            return Err(unsupported("non-NULL parent UUID".into()));
        }
        if blocks_in_image > MAX_BLOCKS {
            return Err(unsupported(format!(
                "too many blocks {blocks_in_image}, max is {MAX_BLOCKS}"
            )));
        }
        Ok(Header {
            disk_size,
            is_static: le32(b, at::IMAGE_TYPE) == TYPE_STATIC,
            offset_bmap,
            offset_data,
            blocks_in_image,
            blocks_allocated: le32(b, at::BLOCKS_ALLOCATED),
        })
    }
}

/// A VDI image's header and block map.
#[derive(Debug)]
pub struct VdiLayout {
    header: Header,
    /// `blocks_in_image` u32 entries; those past the end of the file are
    /// zero (block 0), as QEMU's zero-filled read of the map gives them.
    bmap: RwLock<Table>,
    /// The header's count of allocated blocks, which names the next
    /// block a write allocates.
    allocated: AtomicU32,
}

/// Opens a VDI image (read-only: a writable `st` is refused).
pub fn open(st: Storage) -> Result<Vdi> {
    let mut b = [0u8; HEADER_LEN];
    st.read_at(&mut b, 0)?;
    let header = Header::parse(&b)?;
    let bmap = Table::load(
        &st,
        header.offset_bmap as u64,
        header.blocks_in_image as u64 * 4,
    )?;
    ForeignImage::new(st, VdiLayout::new(header, bmap))
}

impl Layout for VdiLayout {
    fn format(&self) -> Format {
        Format::Vdi
    }
    fn size(&self) -> u64 {
        self.header.disk_size
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(BLOCK_SIZE)
    }
    fn lookup(&self, _st: &Storage, off: u64, len: u64) -> Result<(Where, u64)> {
        let block = off / BLOCK_SIZE;
        let in_block = off % BLOCK_SIZE;
        let n = len.min(BLOCK_SIZE - in_block);
        // block < blocks_in_image: the header check bounds the disk by
        // the map.
        let e = self.map().u32_le(block);
        if e >= FIRST_FREE_ENTRY {
            return Ok((Where::Zero, n));
        }
        // At most 2^32 + 2^32 * 2^20 + 2^20: no overflow.
        let host = self.header.offset_data as u64 + e as u64 * BLOCK_SIZE + in_block;
        Ok((
            Where::Data {
                file: 0,
                host,
                recurse: self.header.is_static,
            },
            n,
        ))
    }
    fn alloc_unit(&self) -> Option<u64> {
        Some(BLOCK_SIZE)
    }
    fn allocate(
        &self,
        st: &Storage,
        index: u64,
        data: &[u8],
        _written: std::ops::Range<usize>,
    ) -> Result<()> {
        let e = self.allocated.load(Ordering::Relaxed);
        if e >= FIRST_FREE_ENTRY - 1 {
            // The next entry would read as free: the count is hostile.
            return Err(Error::Format(format!(
                "VDI image has no room for another block ({e} allocated)"
            )));
        }
        let host = self.header.offset_data as u64 + e as u64 * BLOCK_SIZE;
        // A hostile header can place the next block over the header or
        // the map, which QEMU would overwrite: refused instead.
        let map = self.header.offset_bmap as u64..self.header.offset_bmap as u64 + self.map_len();
        if host < HEADER_LEN as u64 || (host < map.end && host + BLOCK_SIZE > map.start) {
            return Err(Error::Format(format!(
                "VDI image's next block (at {host:#x}) would overlap its header or block map"
            )));
        }
        // The whole block, zeros around the write included (QEMU's).
        st.write_at(data, host)?;
        st.write_at(&(e + 1).to_le_bytes(), at::BLOCKS_ALLOCATED as u64)?;
        self.allocated.store(e + 1, Ordering::Relaxed);
        let mut map = self.bmap.write().unwrap_or_else(|p| p.into_inner());
        map.set_u32_le(index, e);
        // The whole map sector, as QEMU writes it.
        let first = index * 4 / SECTOR * SECTOR;
        st.write_at(
            &map.bytes(first, SECTOR as usize),
            self.header.offset_bmap as u64 + first,
        )
    }
}

/// Writes a new VDI image of `size` bytes (rounded up to a sector) into
/// the empty file `st`, as QEMU's vdi_co_do_create does: a dynamic
/// image's map has every block unallocated; a static one maps block i to
/// i and the file is extended (sparse) to hold them all.
pub fn create(st: &Storage, size: u64, is_static: bool) -> Result<()> {
    let size = size.next_multiple_of(SECTOR);
    if size > MAX_DISK_SIZE {
        return Err(Error::Format(format!(
            "Unsupported VDI image size (size is {size:#x}, max supported is {MAX_DISK_SIZE:#x})"
        )));
    }
    // At most MAX_BLOCKS, whose map fits a u32 offset.
    let blocks = size.div_ceil(BLOCK_SIZE);
    let bmap_len = (blocks * 4).next_multiple_of(SECTOR);
    let offset_bmap = HEADER_LEN as u64;
    let offset_data = offset_bmap + bmap_len;
    let mut h = [0u8; HEADER_LEN];
    let text = b"<<< QEMU VM Virtual Disk Image >>>\n";
    h[..text.len()].copy_from_slice(text);
    let mut put = |at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put(SIGNATURE_AT, SIGNATURE);
    put(at::VERSION, VERSION_1_1);
    put(at::HEADER_SIZE, 0x180);
    put(at::IMAGE_TYPE, if is_static { TYPE_STATIC } else { 1 });
    put(at::OFFSET_BMAP, offset_bmap as u32);
    put(at::OFFSET_DATA, offset_data as u32);
    put(at::SECTOR_SIZE, SECTOR as u32);
    put(at::BLOCK_SIZE, BLOCK_SIZE as u32);
    put(at::BLOCKS_IN_IMAGE, blocks as u32);
    if is_static {
        put(at::BLOCKS_ALLOCATED, blocks as u32);
    }
    h[at::DISK_SIZE..at::DISK_SIZE + 8].copy_from_slice(&size.to_le_bytes());
    // Random (version 4) UUIDs for the image and its last snapshot.
    for uuid_at in [at::UUID_IMAGE, at::UUID_LAST_SNAP] {
        let u = &mut h[uuid_at..uuid_at + 16];
        crate::crypto::random_bytes(u)?;
        // Stored as QEMU stores it: the first three fields little-endian,
        // so the version nibble lies in byte 7.
        u[7] = (u[7] & 0x0f) | 0x40;
        u[8] = (u[8] & 0x3f) | 0x80;
    }
    st.write_at(&h, 0)?;
    // Written in pieces: a map can be 2 GiB.
    const PIECE: u64 = 1 << 20;
    let mut done = 0;
    while done < bmap_len {
        let n = PIECE.min(bmap_len - done);
        let mut piece = vec![0u8; n as usize];
        for (k, e) in piece.chunks_exact_mut(4).enumerate() {
            let i = done / 4 + k as u64;
            let v = match i < blocks {
                true if is_static => i as u32,
                true => u32::MAX,
                false => 0,
            };
            e.copy_from_slice(&v.to_le_bytes());
        }
        st.write_at(&piece, offset_bmap + done)?;
        done += n;
    }
    if is_static {
        st.set_len(offset_data + blocks * BLOCK_SIZE)?;
    }
    Ok(())
}

/// Most check messages kept; a hostile map can make one per block (half
/// a billion), and a report must not take more memory than the file.
const MAX_MESSAGES: usize = 10_000;

impl VdiLayout {
    fn new(header: Header, bmap: Table) -> VdiLayout {
        VdiLayout {
            allocated: AtomicU32::new(header.blocks_allocated),
            header,
            bmap: RwLock::new(bmap),
        }
    }

    /// Bytes of the block map, whole sectors as QEMU reads it.
    fn map_len(&self) -> u64 {
        (self.header.blocks_in_image as u64 * 4).next_multiple_of(SECTOR)
    }

    /// Whether the block map and the data area stay clear of each other
    /// and of the header, as every image QEMU or rimg makes has them.
    pub fn areas_apart(&self) -> bool {
        let bmap = self.header.offset_bmap as u64;
        bmap >= HEADER_LEN as u64 && self.header.offset_data as u64 >= bmap + self.map_len()
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.bmap.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// qemu-img check of a VDI image: every allocated map entry must
    /// name a block below the block count, no block may be used twice,
    /// and the header's count of allocated blocks must match (QEMU's
    /// messages; it prints the doubly used block number twice). No
    /// repair: qemu-img says the format has no checks then.
    pub fn check(&self) -> CheckReport {
        let blocks = self.header.blocks_in_image as u64;
        let mut rep = CheckReport::default();
        let mut dropped = 0u64;
        let mut say = |rep: &mut CheckReport, m: String| {
            rep.corruptions += 1;
            if rep.messages.len() < MAX_MESSAGES {
                rep.messages.push(m);
            } else {
                dropped += 1;
            }
        };
        // Held entries only: at most one per 4 bytes of the file.
        let mut used: HashSet<u32> = HashSet::new();
        let mut allocated = 0u64;
        let bmap = self.map();
        let in_file = bmap.entries_in_file(4).min(blocks);
        for b in 0..in_file {
            let e = bmap.u32_le(b);
            if e >= FIRST_FREE_ENTRY {
                continue;
            }
            if (e as u64) < blocks {
                allocated += 1;
                if !used.insert(e) {
                    say(&mut rep, format!("ERROR: block index {e} also used by {e}"));
                }
            } else {
                say(
                    &mut rep,
                    format!("ERROR: block index {b} too large, is {e}"),
                );
            }
        }
        // The entries past the end of the file all read as 0: each one
        // allocates block 0, and all but the first to do so (if none in
        // the file did) use it twice.
        let tail = blocks - in_file;
        if tail > 0 {
            allocated += tail;
            let first = used.insert(0);
            let twice = tail - first as u64;
            for _ in 0..twice.min(MAX_MESSAGES as u64 + 1) {
                say(&mut rep, "ERROR: block index 0 also used by 0".into());
            }
            let more = twice.saturating_sub(MAX_MESSAGES as u64 + 1);
            rep.corruptions += more;
            dropped += more;
        }
        if dropped > 0 {
            // rimg's own line: QEMU would print every one of them.
            rep.messages.push(format!(
                "ERROR: {dropped} more errors like the above not listed"
            ));
        }
        let counted = self.allocated.load(Ordering::Relaxed);
        if allocated != counted as u64 {
            rep.corruptions += 1;
            rep.messages.push(format!(
                "ERROR: allocated blocks mismatch, is {allocated}, should be {counted}"
            ));
        }
        rep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dynamic 5 MiB header: map at 512, data at 1024, 5 blocks.
    fn header() -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let put = |b: &mut [u8; HEADER_LEN], at: usize, v: u32| {
            b[at..at + 4].copy_from_slice(&v.to_le_bytes())
        };
        put(&mut b, SIGNATURE_AT, SIGNATURE);
        put(&mut b, at::VERSION, VERSION_1_1);
        put(&mut b, at::IMAGE_TYPE, 1);
        put(&mut b, at::OFFSET_BMAP, 512);
        put(&mut b, at::OFFSET_DATA, 1024);
        put(&mut b, at::SECTOR_SIZE, 512);
        b[at::DISK_SIZE..at::DISK_SIZE + 8].copy_from_slice(&(5u64 << 20).to_le_bytes());
        put(&mut b, at::BLOCK_SIZE, 1 << 20);
        put(&mut b, at::BLOCKS_IN_IMAGE, 5);
        b
    }

    fn err(b: &[u8; HEADER_LEN]) -> String {
        Header::parse(b).unwrap_err().to_string()
    }

    #[test]
    fn header_checks_in_qemu_order() {
        let mut b = header();
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.disk_size, 5 << 20);
        assert!(!h.is_static);
        // An odd size is rounded up to a sector.
        b[at::DISK_SIZE..at::DISK_SIZE + 8].copy_from_slice(&3_000_000u64.to_le_bytes());
        assert_eq!(Header::parse(&b).unwrap().disk_size, 3_000_320);
        // Size first: before the signature is even looked at.
        b[SIGNATURE_AT] = 0;
        b[at::DISK_SIZE..at::DISK_SIZE + 8].copy_from_slice(&(MAX_DISK_SIZE + 1).to_le_bytes());
        assert_eq!(
            err(&b),
            "Unsupported VDI image size (size is 0x1fffff8000001, max supported is 0x1fffff8000000)"
        );
        b[at::DISK_SIZE..at::DISK_SIZE + 8].copy_from_slice(&(6u64 << 20).to_le_bytes());
        assert_eq!(err(&b), "Image not in VDI format (bad signature beda1000)");
        b[SIGNATURE_AT] = 0x7f;
        b[at::VERSION] = 2;
        b[at::SECTOR_SIZE] = 1;
        assert_eq!(err(&b), "unsupported VDI image (version 1.2)");
        b[at::VERSION] = 1;
        assert_eq!(
            err(&b),
            "unsupported VDI image (sector size 513 is not 512)"
        );
        b[at::SECTOR_SIZE] = 0;
        assert_eq!(
            err(&b),
            "unsupported VDI image (disk size 6291456, image bitmap has room for 5242880)"
        );
        b[at::BLOCKS_IN_IMAGE..at::BLOCKS_IN_IMAGE + 4]
            .copy_from_slice(&(MAX_BLOCKS + 1).to_le_bytes());
        b[at::UUID_PARENT + 15] = 1;
        assert_eq!(err(&b), "unsupported VDI image (non-NULL parent UUID)");
        b[at::UUID_PARENT + 15] = 0;
        assert_eq!(
            err(&b),
            "unsupported VDI image (too many blocks 536870785, max is 536870784)"
        );
    }

    fn layout(entries: &[u32], blocks: u32, allocated: u32) -> VdiLayout {
        let mut bytes = Vec::new();
        for e in entries {
            bytes.extend(e.to_le_bytes());
        }
        let p = std::env::temp_dir().join(format!(
            "rimg-vdi-map-{}-{blocks}-{allocated}-{}",
            std::process::id(),
            entries.len()
        ));
        std::fs::write(&p, &bytes).unwrap();
        let st = Storage::open(&p, false).unwrap();
        let bmap = Table::load(&st, 0, blocks as u64 * 4).unwrap();
        std::fs::remove_file(&p).unwrap();
        let header = Header {
            disk_size: blocks as u64 * BLOCK_SIZE,
            is_static: false,
            offset_bmap: 0,
            offset_data: 4096,
            blocks_in_image: blocks,
            blocks_allocated: allocated,
        };
        VdiLayout::new(header, bmap)
    }

    #[test]
    fn check_counts_as_qemu_does() {
        let free = u32::MAX;
        assert_eq!(layout(&[0, free, 1], 3, 2).check(), CheckReport::default());
        let r = layout(&[1, 1, 7, free - 1], 4, 2).check();
        assert_eq!(
            r.messages,
            [
                "ERROR: block index 1 also used by 1",
                "ERROR: block index 2 too large, is 7",
            ]
        );
        assert_eq!(r.corruptions, 2);
        // Past the end of the file every entry is 0: block 0, used by
        // the first of them, then twice by each other one.
        let r = layout(&[1], 4, 4).check();
        assert_eq!(r.corruptions, 2);
        assert_eq!(r.messages, ["ERROR: block index 0 also used by 0"; 2]);
        // A hostile count: the report stays small, the count exact.
        let r = layout(&[free], MAX_BLOCKS, 0).check();
        assert_eq!(r.messages.len(), MAX_MESSAGES + 2);
        assert_eq!(r.corruptions, MAX_BLOCKS as u64 - 2 + 1);
        assert_eq!(
            r.messages.last().unwrap(),
            &format!(
                "ERROR: allocated blocks mismatch, is {}, should be 0",
                MAX_BLOCKS - 1
            )
        );
    }

    #[test]
    fn lookup_maps_blocks_and_holes() {
        let l = layout(&[2, u32::MAX, 0xffff_fffe], 3, 1);
        let (w, n) = l
            .lookup(&super::super::tests_null(), 100, 10 << 20)
            .unwrap();
        assert_eq!(
            (w, n),
            (
                Where::Data {
                    file: 0,
                    host: 4096 + 2 * BLOCK_SIZE + 100,
                    recurse: false
                },
                BLOCK_SIZE - 100
            )
        );
        assert_eq!(
            l.lookup(&super::super::tests_null(), BLOCK_SIZE, 5)
                .unwrap(),
            (Where::Zero, 5)
        );
        assert_eq!(
            l.lookup(&super::super::tests_null(), 2 * BLOCK_SIZE + 1, BLOCK_SIZE)
                .unwrap(),
            (Where::Zero, BLOCK_SIZE - 1)
        );
    }
}
