//! The VHDX header section (MS-VHDX 2.2 "Header Section", 2.6
//! "Metadata Region"), decoded as QEMU's vhdx.c decodes it, in its order
//! and with its errors: the file identifier, the two headers (the valid
//! one with the higher sequence number), the region table (the BAT and
//! metadata regions, overlaps refused) and the metadata items.

use super::super::crc32c::crc32c_without;
use super::{einval, errno, refuse};
use crate::error::Result;
use crate::storage::Storage;

pub(super) const MIB: u64 = 1 << 20;
pub(super) const HEADERS: [u64; 2] = [0x10000, 0x20000];
/// A header's checksum covers 4 KiB; QEMU compares 80 bytes of two.
pub(super) const HEADER_CRC_LEN: usize = 4096;
pub(super) const HEADER_LEN: usize = 80;
pub(super) const REGION_TABLE: u64 = 0x30000;
pub(super) const TABLE_LEN: usize = 64 << 10;
const MAX_REGIONS: u32 = 2047;
/// Metadata entries past these bytes of the table do not fit (QEMU).
const METADATA_ENTRIES_END: usize = 65504;

/// Region and metadata item GUIDs, as stored (little-endian fields).
pub(super) const BAT_GUID: [u8; 16] = guid("6677c22d23f600429d64115e9bfd4a08");
pub(super) const METADATA_GUID: [u8; 16] = guid("06a27c8b90479a4bb8fe575f050f886e");
pub(super) const FILE_PARAMETERS: [u8; 16] = guid("3767a1ca36fa434db3b633f0aa44e76b");
pub(super) const VIRTUAL_DISK_SIZE: [u8; 16] = guid("2442a52f1bcd7648b2115dbed83bf4b8");
pub(super) const PAGE83: [u8; 16] = guid("ab12cabee6b2234593efc309e000c746");
pub(super) const LOGICAL_SECTOR_SIZE: [u8; 16] = guid("1dbf41816fa90947ba47f233a8faab5f");
pub(super) const PHYSICAL_SECTOR_SIZE: [u8; 16] = guid("c748a3cd5d4471449cc9e9885251c556");
const PARENT_LOCATOR: [u8; 16] = guid("2d5fd3a80bb34d45abf7d3d84834ab0c");
/// The items an image must have, and no others (QEMU's check).
const REQUIRED: [[u8; 16]; 5] = [
    FILE_PARAMETERS,
    VIRTUAL_DISK_SIZE,
    PAGE83,
    LOGICAL_SECTOR_SIZE,
    PHYSICAL_SECTOR_SIZE,
];

const fn guid(hex: &str) -> [u8; 16] {
    let h = hex.as_bytes();
    let mut g = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        g[i] = nibble(h[2 * i]) << 4 | nibble(h[2 * i + 1]);
        i += 1;
    }
    g
}

const fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        _ => c - b'a' + 10,
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

pub(super) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The header in use (MS-VHDX 2.2.2), and both headers' 4 KiB as read
/// (a writer updates the other one).
#[derive(Debug, Clone)]
pub(super) struct Header {
    pub log_guid: [u8; 16],
    pub log_version: u16,
    pub log_length: u32,
    pub log_offset: u64,
    pub raw: [Vec<u8>; 2],
    /// Which of `raw` is in use.
    pub current: usize,
}

/// A registered range of the file, [start, end) as QEMU's wrapping sum
/// makes it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Region {
    pub start: u64,
    pub end: u64,
}

impl Region {
    fn new(start: u64, len: u64) -> Region {
        Region {
            start,
            end: start.wrapping_add(len),
        }
    }

    /// QEMU's overlap test of [start, start + len) with this region.
    pub fn overlaps(&self, start: u64, len: u64) -> bool {
        let end = start.wrapping_add(len);
        !(start >= self.end || end <= self.start)
    }
}

/// The overlap message of QEMU's vhdx_region_check (its "%.lu" prints
/// an end of 0 as nothing).
pub(super) fn overlap_message(start: u64, len: u64, r: &Region) -> String {
    let end = |v: u64| if v == 0 { String::new() } else { v.to_string() };
    format!(
        "VHDX region {start}-{} overlaps with region {}-{}",
        start.wrapping_add(len),
        r.start,
        end(r.end)
    )
}

/// What the header section says.
#[derive(Debug)]
pub(super) struct Meta {
    pub header: Header,
    /// In registration order (the log's first); QEMU names the most
    /// recent overlapping one.
    pub regions: Vec<Region>,
    pub bat_offset: u64,
    pub bat_length: u32,
    pub block_size: u32,
    pub virtual_disk_size: u64,
}

/// Whether QEMU's block layer reads `len` bytes at `off`.
pub(super) fn readable(off: u64, len: u64) -> bool {
    off.checked_add(len)
        .is_some_and(|end| end <= super::super::MAX_OFFSET)
}

fn read(st: &Storage, off: u64, len: usize) -> Result<Vec<u8>> {
    if !readable(off, len as u64) {
        return Err(errno(st, libc::EIO));
    }
    let mut b = vec![0u8; len];
    st.read_at(&mut b, off)?;
    Ok(b)
}

impl Meta {
    /// Reads the header section of `st` up to the metadata (QEMU's
    /// vhdx_open before the BAT). A log with entries is refused by the
    /// caller.
    pub(super) fn read(st: &Storage) -> Result<Meta> {
        let mut sig = [0u8; 8];
        st.read_at(&mut sig, 0)?;
        if &sig != b"vhdxfile" {
            return Err(einval(st));
        }
        let header = Self::header(st)?;
        let mut regions = vec![Region::new(header.log_offset, header.log_length as u64)];
        // vhdx_parse_log's checks (of an empty log too), before the
        // region table is read.
        if header.log_offset < MIB || header.log_offset % MIB != 0 || header.log_version != 0 {
            return Err(einval(st));
        }
        if header.log_guid != [0; 16] && header.log_length != 0 {
            if !(header.log_length as u64).is_multiple_of(MIB) {
                return Err(einval(st));
            }
            // QEMU searches the log here (and replays it when writable).
            return Err(refuse(
                "VHDX images with a log (not known to be empty) are not supported by rimg yet",
            ));
        }
        let (bat, metadata) = Self::regions(st, &mut regions)?;
        let mut meta = Meta {
            header,
            regions,
            bat_offset: bat.0,
            bat_length: bat.1,
            block_size: 0,
            virtual_disk_size: 0,
        };
        meta.metadata(st, metadata)?;
        Ok(meta)
    }

    /// The header in use: the valid one, or of two the higher sequence
    /// number; equal numbers only with equal headers.
    fn header(st: &Storage) -> Result<Header> {
        let mut h = Vec::new();
        for at in HEADERS {
            let b = read(st, at, HEADER_CRC_LEN)?;
            let valid =
                le32(&b, 4) == crc32c_without(&b, 4) && &b[..4] == b"head" && le16(&b, 66) == 1;
            h.push((valid, le64(&b, 8), b));
        }
        let pick = match (h[0].0, h[1].0) {
            (true, true) if h[0].1 > h[1].1 => 0,
            (true, true) if h[1].1 > h[0].1 => 1,
            (true, true) if h[0].2[..HEADER_LEN] == h[1].2[..HEADER_LEN] => 0,
            (true, false) => 0,
            (false, true) => 1,
            _ => return Err(refuse("No valid VHDX header found")),
        };
        let b = &h[pick].2;
        Ok(Header {
            log_guid: b[48..64].try_into().unwrap(),
            log_version: le16(b, 64),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
            raw: [h[0].2.clone(), h[1].2.clone()],
            current: pick,
        })
    }

    /// The region table: each entry checked against the regions before
    /// it and registered; the BAT's and metadata's (offset, length).
    #[allow(clippy::type_complexity)]
    fn regions(st: &Storage, regions: &mut Vec<Region>) -> Result<((u64, u32), (u64, u32))> {
        let b = read(st, REGION_TABLE, TABLE_LEN)?;
        let count = le32(&b, 8);
        if le32(&b, 4) != crc32c_without(&b, 4) || &b[..4] != b"regi" || count > MAX_REGIONS {
            return Err(einval(st));
        }
        let (mut bat, mut metadata) = (None, None);
        for i in 0..count as usize {
            let e = &b[16 + 32 * i..48 + 32 * i];
            let (off, len) = (le64(e, 16), le32(e, 24));
            if let Some(r) = regions.iter().rev().find(|r| r.overlaps(off, len as u64)) {
                crate::storage::error_report(&overlap_message(off, len as u64, r));
                return Err(einval(st));
            }
            regions.push(Region::new(off, len as u64));
            let slot = match e[..16].try_into().unwrap() {
                BAT_GUID => &mut bat,
                METADATA_GUID => &mut metadata,
                // An unknown region the image requires.
                _ if le32(e, 28) & 1 != 0 => return Err(errno(st, libc::ENOTSUP)),
                _ => continue,
            };
            if slot.replace((off, len)).is_some() {
                return Err(einval(st));
            }
        }
        match (bat, metadata) {
            (Some(b), Some(m)) => Ok((b, m)),
            _ => Err(einval(st)),
        }
    }

    /// The metadata table and the items QEMU reads from it.
    fn metadata(&mut self, st: &Storage, (at, _): (u64, u32)) -> Result<()> {
        let b = read(st, at, TABLE_LEN)?;
        let count = le16(&b, 10) as usize;
        if &b[..8] != b"metadata" || count * 32 > METADATA_ENTRIES_END {
            return Err(einval(st));
        }
        let mut present: Vec<([u8; 16], u32, u32)> = Vec::new();
        for i in 0..count {
            let e = &b[32 + 32 * i..64 + 32 * i];
            let id: [u8; 16] = e[..16].try_into().unwrap();
            let known = REQUIRED.contains(&id) || id == PARENT_LOCATOR;
            if known {
                if present.iter().any(|p| p.0 == id) {
                    return Err(einval(st));
                }
                present.push((id, le32(e, 16), le32(e, 24)));
            } else if le32(e, 24) & 4 != 0 {
                return Err(errno(st, libc::ENOTSUP));
            }
        }
        // Exactly the required items: a parent locator (a differencing
        // image) is not supported, as in QEMU.
        if present.len() != REQUIRED.len() || present.iter().any(|p| p.0 == PARENT_LOCATOR) {
            return Err(errno(st, libc::ENOTSUP));
        }
        let item = |id: [u8; 16], len: usize| -> Result<Vec<u8>> {
            let off = present.iter().find(|p| p.0 == id).unwrap().1;
            read(st, at.wrapping_add(off as u64), len)
        };
        let params = item(FILE_PARAMETERS, 8)?;
        if le32(&params, 4) & 2 != 0 {
            // has_parent without a locator.
            return Err(einval(st));
        }
        let block_size = le32(&params, 0);
        let vds = le64(&item(VIRTUAL_DISK_SIZE, 8)?, 0);
        let lss = le32(&item(LOGICAL_SECTOR_SIZE, 4)?, 0);
        item(PHYSICAL_SECTOR_SIZE, 4)?;
        if !(MIB as u32..=256 * MIB as u32).contains(&block_size) {
            return Err(einval(st));
        }
        if lss != 512 {
            return Err(errno(st, libc::ENOTSUP));
        }
        if !(block_size / 512).is_power_of_two() || !block_size.is_multiple_of(512) {
            return Err(einval(st));
        }
        self.block_size = block_size;
        self.virtual_disk_size = vds;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_stored_as_written() {
        assert_eq!(BAT_GUID[..4], [0x66, 0x77, 0xc2, 0x2d]);
        assert_eq!(PARENT_LOCATOR[15], 0x0c);
    }

    #[test]
    fn overlaps_as_qemu_tests_them() {
        let r = Region::new(2 * MIB, MIB);
        assert!(r.overlaps(2 * MIB, 1));
        assert!(r.overlaps(MIB + 1, MIB));
        assert!(!r.overlaps(MIB, MIB));
        assert!(!r.overlaps(3 * MIB, MIB));
        // An empty region inside another overlaps.
        assert!(Region::new(MIB, 2 * MIB).overlaps(2 * MIB, 0));
        assert_eq!(
            overlap_message(MIB, MIB, &Region::new(u64::MAX - 9, 10)),
            "VHDX region 1048576-2097152 overlaps with region 18446744073709551606-"
        );
    }
}
