//! VHDX images (Hyper-V, Azure), as QEMU's vhdx driver reads and writes
//! them (writes and creation in `vhdx/write.rs`): dynamic and fixed
//! disks. Differencing disks are refused as QEMU refuses them (a parent
//! locator is "not supported"), and so, for now, is an image whose log
//! may hold entries (QEMU replays it only when writable; rimg does not
//! read logs yet), and a writable open of one whose log is not empty.
//!
//! Layout (MS-VHDX; little-endian): the header section (`vhdx/meta.rs`),
//! then the BAT: one u64 per payload block (state in bits 0-2, the file
//! offset in bits 20-63), with a sector bitmap entry after every
//! `chunk_ratio` (2^32 / block size) payload entries.
//!
//! What QEMU does, and rimg with it:
//! - a fully present block (state 6) reads from the file, zeros past its
//!   end; an offset of 0 reads from the file's start whatever the offset
//!   in the block (QEMU does not add it then); states 0-3 and 5 read as
//!   zeros; 4 and 7 (partially present: differencing) fail with EIO;
//! - block status is the block layer's default (QEMU's driver has none):
//!   everything is data, with no offset;
//! - at open every fully present entry is checked against the file's end
//!   and the regions (`check` reports them all); the BAT is held only as
//!   far as the file goes.

use std::sync::RwLock;

use super::table::Table;
use super::{ForeignImage, Layout, Where};
use crate::check::report::CheckReport;
use crate::error::{Error, Result};
use crate::image::Format;
use crate::storage::Storage;

mod meta;
mod write;
use meta::{overlap_message, readable, Meta, Region};
pub use write::create;

/// A VHDX image.
pub type Vhdx = ForeignImage<VhdxLayout>;

/// The probe: the file identifier's signature.
pub const SIGNATURE: &[u8; 8] = b"vhdxfile";
const STATE_MASK: u64 = 7;
const OFFSET_MASK: u64 = !((1 << 20) - 1);
const FULLY_PRESENT: u64 = 6;
/// The largest BAT QEMU reads in one request.
const MAX_BAT_READ: u32 = 0x7FFF_FE00;

fn refuse(msg: impl Into<String>) -> Error {
    Error::Format(msg.into())
}

/// QEMU's open failures without a message of their own: the errno, said
/// for the file.
fn errno(st: &Storage, e: i32) -> Error {
    let e = crate::error::strerror(&std::io::Error::from_raw_os_error(e));
    refuse(format!("Could not open '{}': {e}", st.path().display()))
}

fn einval(st: &Storage) -> Error {
    errno(st, libc::EINVAL)
}

/// A VHDX image's block size, size and BAT.
#[derive(Debug)]
pub struct VhdxLayout {
    block_size: u64,
    /// log2 of the payload entries between two sector bitmap entries.
    chunk_ratio_bits: u32,
    /// Disk bytes (whole sectors).
    size: u64,
    bat_entries: u32,
    /// Entries QEMU holds (the BAT region's length / 8): past them an
    /// index reads as 0.
    bat_slots: u64,
    bat_offset: u64,
    bat: RwLock<Table>,
    regions: Vec<Region>,
    /// The headers, when open for writing.
    headers: Option<write::Headers>,
}

/// Opens a VHDX image; `for_check` as qemu-img check opens it: the BAT
/// is checked by the check, not at open.
pub fn open(st: Storage, for_check: bool) -> Result<Vhdx> {
    let layout = VhdxLayout::read(&st, !for_check)?;
    ForeignImage::new(st, layout)
}

impl VhdxLayout {
    /// QEMU's vhdx_open; `check_bat` unless opened for qemu-img check.
    fn read(st: &Storage, check_bat: bool) -> Result<VhdxLayout> {
        let m = Meta::read(st)?;
        let h = &m.header;
        // QEMU replays a log with entries at a writable open (rimg does
        // not yet), or fails its first allocation with an unexpected
        // log GUID.
        if st.writable() && h.log_guid != [0; 16] {
            return Err(refuse(
                "VHDX images with a log (not known to be empty) are not supported for writing by rimg yet",
            ));
        }
        let headers = st
            .writable()
            .then(|| write::Headers::new(h.raw.clone(), h.current));
        let bs = m.block_size as u64;
        let chunk_ratio = (1u64 << 32) / bs;
        let chunk_ratio_bits = chunk_ratio.trailing_zeros();
        // QEMU's u32 counts.
        let data_blocks = m.virtual_disk_size.div_ceil(bs) as u32;
        let bat_entries = data_blocks.wrapping_add(data_blocks.wrapping_sub(1) >> chunk_ratio_bits);
        if bat_entries as u64 > m.bat_length as u64 / 8 {
            return Err(einval(st));
        }
        if m.bat_length > MAX_BAT_READ || !readable(m.bat_offset, m.bat_length as u64) {
            return Err(errno(st, libc::EIO));
        }
        let bat = Table::load(st, m.bat_offset, m.bat_length as u64)?;
        let l = VhdxLayout {
            block_size: bs,
            chunk_ratio_bits,
            size: (m.virtual_disk_size >> 9) << 9,
            bat_entries,
            bat_slots: m.bat_length as u64 / 8,
            bat_offset: m.bat_offset,
            bat: RwLock::new(bat),
            regions: m.regions,
            headers,
        };
        if check_bat && l.bat_errors(st, true)? > 0 {
            return Err(einval(st));
        }
        // Past QEMU's largest length (in whole sectors).
        if (m.virtual_disk_size >> 9) << 9 > super::MAX_OFFSET {
            return Err(refuse(
                "Could not refresh total sector count: File too large",
            ));
        }
        Ok(l)
    }

    /// The block size (qemu-img info's cluster size).
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// BAT entry `i`: 0 past what QEMU holds.
    fn entry(&self, i: u64) -> u64 {
        if i >= self.bat_slots {
            return 0;
        }
        self.bat.read().unwrap_or_else(|e| e.into_inner()).u64_le(i)
    }

    /// The BAT index of the block holding guest offset `off` (QEMU's u32
    /// block number and index: both wrap).
    fn index(&self, off: u64) -> u64 {
        let b = (off / self.block_size) as u32;
        b.wrapping_add(b >> self.chunk_ratio_bits) as u64
    }

    /// QEMU's vhdx_check_bat_entries: every fully present entry against
    /// the file's end (in whole sectors) and the regions, each finding
    /// reported in its words; with `first`, only the first. Returns how
    /// many there were.
    fn bat_errors(&self, st: &Storage, first: bool) -> Result<u64> {
        let file_size = st.len()?.next_multiple_of(512);
        let stab = Stab::new(&self.regions, self.block_size);
        let mut out = Vec::new();
        let mut count = 0;
        let mut payblocks = 1u64 << self.chunk_ratio_bits;
        // Entries past the file's part of the BAT are 0: not present.
        let n = self
            .bat
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .entries_in_file(8);
        let n = n.min(self.bat_entries as u64);
        for i in 0..n {
            let raw = self.entry(i);
            if raw & STATE_MASK != FULLY_PRESENT {
                continue;
            }
            let off = raw & OFFSET_MASK;
            let bs = self.block_size;
            let len = bs.min(self.size.wrapping_sub(i.wrapping_mul(bs)));
            if off > i64::MAX as u64 - bs {
                out.push(format!("VHDX BAT entry {i} offset overflow."));
            }
            if off >= file_size {
                out.push(format!("VHDX BAT entry {i} start offset {off} points after end of file ({file_size}). Image has probably been truncated."));
            } else if off.wrapping_add(len) > file_size {
                let end = off.wrapping_add(len).wrapping_sub(1);
                out.push(format!("VHDX BAT entry {i} end offset {end} points after end of file ({file_size}). Image has probably been truncated."));
            }
            if payblocks > 0 {
                payblocks -= 1;
                if let Some(r) = stab.find(&self.regions, off) {
                    out.push(overlap_message(off, bs, r));
                }
            } else {
                payblocks = 1 << self.chunk_ratio_bits;
            }
            if first && !out.is_empty() {
                out.truncate(1);
            }
            count += out.len() as u64;
            for m in out.drain(..) {
                crate::storage::error_report(&m);
            }
            if first && count > 0 {
                break;
            }
        }
        Ok(count)
    }

    /// qemu-img check: the BAT's findings (reported as QEMU reports
    /// them), each a corruption.
    pub fn check(&self, st: &Storage) -> Result<CheckReport> {
        Ok(CheckReport {
            corruptions: self.bat_errors(st, false)?,
            ..Default::default()
        })
    }
}

/// The regions a block starting at a given offset overlaps, answered by
/// binary search: each region r takes the starts (r.start - bs, r.end)
/// of a block of `bs` bytes that does not wrap; an answer is the most
/// recently registered region (QEMU's list is newest first). Blocks that
/// wrap past 2^64 (fewer than 256 offsets) are tested one by one.
struct Stab {
    /// Elementary intervals: (first start, index of the newest region
    /// covering it, if any), sorted by start.
    cuts: Vec<(u64, Option<usize>)>,
    bs: u64,
}

impl Stab {
    fn new(regions: &[Region], bs: u64) -> Stab {
        let spans: Vec<(u64, u64)> = regions
            .iter()
            .map(|r| (r.start.saturating_sub(bs - 1), r.end))
            .collect();
        let mut points: Vec<u64> = spans.iter().flat_map(|&(a, b)| [a, b]).collect();
        points.push(0);
        points.sort_unstable();
        points.dedup();
        let cuts = points
            .iter()
            .map(|&p| {
                let newest = spans.iter().rposition(|&(a, b)| a <= p && p < b);
                (p, newest)
            })
            .collect();
        Stab { cuts, bs }
    }

    fn find<'a>(&self, regions: &'a [Region], start: u64) -> Option<&'a Region> {
        if start > u64::MAX - self.bs {
            // Rare (offsets are whole MiB): tested as QEMU tests them.
            return regions.iter().rev().find(|r| r.overlaps(start, self.bs));
        }
        let i = self.cuts.partition_point(|&(p, _)| p <= start) - 1;
        self.cuts[i].1.map(|k| &regions[k])
    }
}

impl Layout for VhdxLayout {
    fn format(&self) -> Format {
        Format::Vhdx
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.block_size)
    }
    fn opaque_status(&self) -> bool {
        true
    }
    fn lookup(&self, _st: &Storage, off: u64, len: u64) -> Result<(Where, u64)> {
        let bs = self.block_size;
        let in_block = off % bs;
        let n = len.min(bs - in_block);
        let raw = self.entry(self.index(off));
        let w = match raw & STATE_MASK {
            FULLY_PRESENT => {
                let base = raw & OFFSET_MASK;
                Where::Data {
                    file: 0,
                    // QEMU adds nothing to an offset of 0: the read starts
                    // at the file's start (within its first sector).
                    host: if base == 0 {
                        off % 512
                    } else {
                        // Entries past the BAT's count are never checked;
                        // QEMU's sum wraps.
                        base.wrapping_add(in_block)
                    },
                    recurse: false,
                }
            }
            4 | 7 => Where::Eio,
            _ => Where::Zero,
        };
        Ok((w, n))
    }
    fn alloc_unit(&self) -> Option<u64> {
        Some(self.block_size)
    }
    fn sparse_units(&self) -> bool {
        true
    }
    fn before_write(&self, st: &Storage, off: u64) -> Result<()> {
        VhdxLayout::before_write(self, st, off)
    }
    fn allocate(
        &self,
        st: &Storage,
        index: u64,
        data: &[u8],
        written: std::ops::Range<usize>,
    ) -> Result<()> {
        VhdxLayout::allocate(self, st, index, data, written)
    }
}

/// Whether `first` (the first bytes of a file) is a VHDX.
pub fn probe(first: &[u8]) -> bool {
    first.starts_with(SIGNATURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stabbing_answers_the_newest_overlapping_region() {
        let mib = 1u64 << 20;
        let regions = [
            Region {
                start: mib,
                end: 2 * mib,
            },
            Region {
                start: 2 * mib,
                end: 3 * mib,
            },
            Region {
                start: 3 * mib,
                end: 4 * mib,
            },
            Region {
                start: 0,
                end: 8 * mib,
            },
        ];
        let s = Stab::new(&regions, mib);
        let found = |at| s.find(&regions, at).map(|r| r.start);
        assert_eq!(found(2 * mib), Some(0));
        let s = Stab::new(&regions[..3], mib);
        let found = |at| s.find(&regions[..3], at).map(|r| r.start);
        assert_eq!(found(0), None);
        assert_eq!(found(mib), Some(mib));
        assert_eq!(found(mib + 1), Some(2 * mib));
        assert_eq!(found(4 * mib), None);
        assert_eq!(found(4 * mib - 1), Some(3 * mib));
        // Checked against QEMU's test itself.
        for at in (0..6 * mib).step_by(4096 * 7) {
            let want = regions[..3].iter().rev().find(|r| r.overlaps(at, mib));
            assert_eq!(
                s.find(&regions[..3], at).map(|r| r.start),
                want.map(|r| r.start)
            );
        }
    }
}
