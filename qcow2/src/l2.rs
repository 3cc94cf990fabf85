//! L1 and L2 table entries (qcow2.rst, "Cluster mapping").

use crate::error::Result;
use crate::storage::Storage;

/// Bit 63 of L1 and standard L2 entries: the refcount of the cluster is
/// exactly one, so it may be written in place.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry (version 3): the cluster reads as zeros.
pub const ZERO: u64 = 1;
/// An extended L2 entry's first word as a standard entry decodes it:
/// bit 0 is no zero flag there (the bitmap says which subclusters read
/// as zeros), except in a compressed entry, where it is part of the
/// byte-granular host offset.
pub fn strip_ext_zero(raw: u64) -> u64 {
    if raw & COMPRESSED != 0 {
        raw
    } else {
        raw & !ZERO
    }
}
/// Bits 9-55: host cluster offset in L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (1-8, 56-62) that must be zero.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01fe;
/// Reserved bits of a standard L2 entry (1-8, 56-61).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Decoded L1 entry: where the L2 table is, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    pub fn l2_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }
    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }
    pub fn new(offset: u64, copied: bool) -> Self {
        L1Entry(offset | if copied { COPIED } else { 0 })
    }
}

/// Geometry of compressed cluster descriptors, which depends on the
/// cluster size (qcow2.rst, "Compressed Clusters Descriptor").
#[derive(Debug, Clone, Copy)]
pub struct CompressedGeometry {
    /// x = 62 - (cluster_bits - 8): bits below x hold the host offset.
    pub shift: u32,
    pub offset_mask: u64,
    pub sectors_mask: u64,
}

impl CompressedGeometry {
    pub fn new(cluster_bits: u32) -> Self {
        let shift = 62 - (cluster_bits - 8);
        CompressedGeometry {
            shift,
            offset_mask: (1u64 << shift) - 1,
            sectors_mask: (1u64 << (cluster_bits - 8)) - 1,
        }
    }
}

/// What one guest cluster maps to in this layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here: read from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros. `host` is a preallocated cluster that may be reused
    /// for data; `copied` mirrors its COPIED flag.
    Zero { host: Option<u64>, copied: bool },
    /// Data at a host cluster offset.
    Normal { host: u64, copied: bool },
    /// Compressed data: `len` bytes starting at byte `offset` (the last
    /// sector may hold trailing bytes of something else).
    Compressed { offset: u64, len: u64, sectors: u64 },
}

impl L2Entry {
    pub fn decode(raw: u64, g: CompressedGeometry) -> L2Entry {
        if raw & COMPRESSED != 0 {
            let offset = raw & g.offset_mask;
            let sectors = ((raw >> g.shift) & g.sectors_mask) + 1;
            // The stored range begins at `offset` and ends at the end of
            // the last 512-byte sector counted (QEMU's
            // qcow2_parse_compressed_l2_entry).
            let len = sectors * 512 - (offset & 511);
            return L2Entry::Compressed {
                offset,
                len,
                sectors,
            };
        }
        let host = raw & OFFSET_MASK;
        let copied = raw & COPIED != 0;
        if raw & ZERO != 0 {
            return L2Entry::Zero {
                host: (host != 0).then_some(host),
                copied,
            };
        }
        if host == 0 {
            L2Entry::Unallocated
        } else {
            L2Entry::Normal { host, copied }
        }
    }

    /// As [`decode`](Self::decode), for an image whose data may be in an
    /// external data file: there offset 0 is a valid data cluster, told
    /// from an unallocated entry by its COPIED flag, which every data file
    /// cluster has (qcow2.rst, "Cluster mapping", and QEMU's
    /// qcow2_get_cluster_type).
    pub fn decode_in(raw: u64, g: CompressedGeometry, data_file: bool) -> L2Entry {
        if data_file && raw & (COMPRESSED | ZERO | OFFSET_MASK) == 0 && raw & COPIED != 0 {
            return L2Entry::Normal {
                host: 0,
                copied: true,
            };
        }
        Self::decode(raw, g)
    }

    pub fn encode(self, g: CompressedGeometry) -> u64 {
        match self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { host, copied } => {
                host.unwrap_or(0) | ZERO | if copied { COPIED } else { 0 }
            }
            L2Entry::Normal { host, copied } => host | if copied { COPIED } else { 0 },
            L2Entry::Compressed {
                offset, sectors, ..
            } => COMPRESSED | ((sectors - 1) << g.shift) | offset,
        }
    }

    /// The host range whose refcounts this entry holds a reference on:
    /// (first byte, length), or None.
    pub fn host_range(self, cluster_size: u64) -> Option<(u64, u64)> {
        match self {
            L2Entry::Unallocated | L2Entry::Zero { host: None, .. } => None,
            L2Entry::Zero { host: Some(h), .. } | L2Entry::Normal { host: h, .. } => {
                Some((h, cluster_size))
            }
            L2Entry::Compressed {
                offset, sectors, ..
            } => Some((offset & !511, sectors * 512)),
        }
    }
}

/// Reads an L1 table of `entries` big-endian entries at `off` (the
/// active one or a snapshot's). Entries past the end of the file read as
/// zero (unallocated), as from any short file; they are left as the
/// allocator's zeroed pages rather than read and converted, so a header
/// claiming the largest L1 on a small file costs no time per entry.
pub fn read_l1(st: &Storage, off: u64, entries: u32) -> Result<Vec<u64>> {
    let mut l1 = vec![0u64; entries as usize];
    if entries == 0 {
        return Ok(l1);
    }
    let in_file = entries_in_file(st.len()?, off, entries);
    fill_l1(st, off, &mut l1[..in_file])?;
    Ok(l1)
}

/// The entries of the L1 table of `entries` entries at `off` that lie in
/// the file, `file_len` bytes long: a prefix of the table, whose other
/// entries read as zero and name no L2 table. For walks that only look
/// for tables: a hostile snapshot's L1 claiming 32 MiB on a small file
/// costs nothing past the end (and thousands of them no `stat` each).
pub(crate) fn read_l1_in_file(
    st: &Storage,
    file_len: u64,
    off: u64,
    entries: u32,
) -> Result<Vec<u64>> {
    let mut l1 = vec![0u64; entries_in_file(file_len, off, entries)];
    fill_l1(st, off, &mut l1)?;
    Ok(l1)
}

/// How many of the table's entries start in the file. An entry cut by
/// the end of the file keeps its bytes in the file (the rest reads as
/// zero), as every reader of a short file sees it.
fn entries_in_file(file_len: u64, off: u64, entries: u32) -> usize {
    file_len
        .saturating_sub(off)
        .min(entries as u64 * 8)
        .div_ceil(8) as usize
}

/// Reads `l1.len()` big-endian entries at `off`.
fn fill_l1(st: &Storage, off: u64, l1: &mut [u64]) -> Result<()> {
    // In bounded pieces: no second buffer of the table's full size.
    const CHUNK: usize = 8192;
    let mut raw = vec![0u8; CHUNK.min(l1.len()) * 8];
    for (i, part) in l1.chunks_mut(CHUNK).enumerate() {
        let raw = &mut raw[..part.len() * 8];
        st.read_at(raw, off + (i * CHUNK * 8) as u64)?;
        for (e, c) in part.iter_mut().zip(raw.chunks_exact(8)) {
            *e = u64::from_be_bytes(c.try_into().unwrap());
        }
    }
    Ok(())
}

/// The entries of a table of offsets (an L1 or refcount table) that are
/// not zero, with their indices. Zeros are skipped a run at a time:
/// hostile headers name tables of up to 32 MiB, nearly all zeros, which
/// every open and check walks.
pub(crate) fn nonzero_entries(t: &[u64]) -> impl Iterator<Item = (usize, u64)> + '_ {
    const RUN: usize = 64;
    t.chunks(RUN)
        .enumerate()
        // No branch per entry: the OR of a run is tested once.
        .filter(|(_, run)| run.iter().fold(0, |a, &e| a | e) != 0)
        .flat_map(|(k, run)| {
            run.iter()
                .enumerate()
                .filter(|&(_, &e)| e != 0)
                .map(move |(i, &e)| (k * RUN + i, e))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_roundtrip() {
        for bits in 9..=21 {
            let g = CompressedGeometry::new(bits);
            // The sector count field has cluster_bits - 8 bits.
            let sectors = 3u64.min(1 << (bits - 8));
            let e = L2Entry::Compressed {
                offset: 0x12_3456,
                len: sectors * 512 - (0x12_3456 & 511),
                sectors,
            };
            assert_eq!(L2Entry::decode(e.encode(g), g), e);
        }
    }

    #[test]
    fn standard_entries() {
        let g = CompressedGeometry::new(16);
        assert_eq!(L2Entry::decode(0, g), L2Entry::Unallocated);
        assert_eq!(
            L2Entry::decode(1, g),
            L2Entry::Zero {
                host: None,
                copied: false
            }
        );
        assert_eq!(
            L2Entry::decode(COPIED | 0x10000, g),
            L2Entry::Normal {
                host: 0x10000,
                copied: true
            }
        );
        assert_eq!(
            L2Entry::decode(COPIED | 0x10000 | 1, g),
            L2Entry::Zero {
                host: Some(0x10000),
                copied: true
            }
        );
    }

    #[test]
    fn l1_past_the_end_of_the_file_reads_as_zero() {
        use std::os::unix::fs::FileExt;
        use std::os::unix::io::FromRawFd;
        // SAFETY: a NUL-terminated literal name; the new descriptor is
        // checked and then owned by the File alone.
        let fd = unsafe { libc::memfd_create(c"l1-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        // Two whole entries and five bytes of a third at offset 16.
        let mut data = vec![0u8; 16];
        data.extend_from_slice(&0x1_0000u64.to_be_bytes());
        data.extend_from_slice(&0x2_0000u64.to_be_bytes());
        data.extend_from_slice(&[0, 0x71, 0x71, 0x71, 0x71]);
        f.write_all_at(&data, 0).unwrap();
        let st = Storage::from_file(f, std::path::Path::new("l1-test"), false);
        let l1 = read_l1(&st, 16, 20_000).unwrap();
        assert_eq!(l1.len(), 20_000);
        assert_eq!(&l1[..3], &[0x1_0000, 0x2_0000, 0x0071_7171_7100_0000]);
        assert!(l1[3..].iter().all(|&e| e == 0));
        // Entirely past the end.
        assert!(read_l1(&st, 1 << 20, 10).unwrap().iter().all(|&e| e == 0));
        // The walkers' prefix: the entries that start in the file.
        assert_eq!(
            read_l1_in_file(&st, st.len().unwrap(), 16, 20_000).unwrap(),
            &l1[..3]
        );
        assert_eq!(
            read_l1_in_file(&st, st.len().unwrap(), 16, 2).unwrap(),
            &l1[..2]
        );
        assert!(read_l1_in_file(&st, st.len().unwrap(), 1 << 20, 10)
            .unwrap()
            .is_empty());
    }
}
