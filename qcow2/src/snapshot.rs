//! The internal snapshot table (qcow2.rst, "Snapshots").

use crate::error::{Error, Result};
use crate::header::{Header, MAX_L1_BYTES};
use crate::storage::Storage;

/// QEMU's limit on a snapshot entry's extra data.
pub const MAX_EXTRA_DATA: u32 = 1024;
/// QEMU's limit on the whole snapshot table (QCOW_MAX_SNAPSHOTS_SIZE).
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// Guest disk size when the snapshot was taken (v3 extra data).
    pub disk_size: Option<u64>,
    pub icount: Option<u64>,
    /// Extra data bytes beyond those decoded, kept for rewriting.
    pub extra_unknown: Vec<u8>,
}

impl Snapshot {
    /// Reads and validates the snapshot table named by the header; returns
    /// the entries and the table's length in bytes.
    pub fn read_table(st: &Storage, h: &Header) -> Result<(Vec<Snapshot>, u64)> {
        let cs = h.cluster_size();
        let mut out = Vec::with_capacity(h.nb_snapshots.min(1024) as usize);
        let mut off = h.snapshots_offset;
        let bad = |m: String| Error::Corrupt(format!("snapshot table: {m}"));
        for n in 0..h.nb_snapshots {
            if off - h.snapshots_offset > MAX_TABLE_BYTES {
                return Err(bad("larger than 64 MiB".into()));
            }
            let mut fixed = [0u8; 40];
            st.read_at(&mut fixed, off)?;
            let be32 = |a: usize| u32::from_be_bytes(fixed[a..a + 4].try_into().unwrap());
            let be64 = |a: usize| u64::from_be_bytes(fixed[a..a + 8].try_into().unwrap());
            let l1_table_offset = be64(0);
            let l1_size = be32(8);
            let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as usize;
            let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
            let extra_len = be32(36);
            if extra_len > MAX_EXTRA_DATA {
                return Err(bad(format!(
                    "snapshot {n} has {extra_len} bytes of extra data"
                )));
            }
            if l1_size as u64 > MAX_L1_BYTES / 8 {
                return Err(bad(format!("snapshot {n} L1 table has {l1_size} entries")));
            }
            if l1_table_offset % cs != 0 {
                return Err(bad(format!(
                    "snapshot {n} L1 table offset {l1_table_offset:#x} unaligned"
                )));
            }
            // As for the active L1 (QEMU's validate_table_offset): the
            // table's end must be a file offset, or every user of the
            // range (check, delete) would overflow computing it.
            if l1_table_offset
                .checked_add(l1_size as u64 * 8)
                .is_none_or(|end| end > i64::MAX as u64)
            {
                return Err(bad(format!(
                    "snapshot {n} L1 table at {l1_table_offset:#x} extends past the largest file offset"
                )));
            }
            let var_len = extra_len as usize + id_len + name_len;
            let mut var = vec![0u8; var_len];
            st.read_at(&mut var, off + 40)?;
            let extra = &var[..extra_len as usize];
            let e64 = |a: usize| {
                (extra.len() >= a + 8)
                    .then(|| u64::from_be_bytes(extra[a..a + 8].try_into().unwrap()))
            };
            let vm_state_size = e64(0).unwrap_or(be32(32) as u64);
            let id = String::from_utf8_lossy(&var[extra_len as usize..extra_len as usize + id_len])
                .into_owned();
            let name = String::from_utf8_lossy(&var[extra_len as usize + id_len..]).into_owned();
            out.push(Snapshot {
                l1_table_offset,
                l1_size,
                id,
                name,
                date_sec: be32(16),
                date_nsec: be32(20),
                vm_clock_nsec: be64(24),
                vm_state_size,
                disk_size: e64(8),
                icount: e64(16),
                extra_unknown: extra.get(24..).map(|s| s.to_vec()).unwrap_or_default(),
            });
            off = (off + 40 + var_len as u64).next_multiple_of(8);
        }
        Ok((out, off - h.snapshots_offset))
    }
}

impl Snapshot {
    /// Serialises a snapshot table (qcow2.rst, "Snapshot table"): each
    /// entry padded to 8 bytes, with the version 3 extra data (VM state
    /// size, disk size, icount) followed by any extra data we kept.
    pub fn encode_table(snaps: &[Snapshot]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in snaps {
            let mut extra = Vec::with_capacity(24 + s.extra_unknown.len());
            extra.extend_from_slice(&s.vm_state_size.to_be_bytes());
            extra.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
            extra.extend_from_slice(&s.icount.unwrap_or(0).to_be_bytes());
            extra.extend_from_slice(&s.extra_unknown);
            out.extend_from_slice(&s.l1_table_offset.to_be_bytes());
            out.extend_from_slice(&s.l1_size.to_be_bytes());
            out.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
            out.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
            out.extend_from_slice(&s.date_sec.to_be_bytes());
            out.extend_from_slice(&s.date_nsec.to_be_bytes());
            out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
            out.extend_from_slice(&(s.vm_state_size.min(u32::MAX as u64) as u32).to_be_bytes());
            out.extend_from_slice(&(extra.len() as u32).to_be_bytes());
            out.extend_from_slice(&extra);
            out.extend_from_slice(s.id.as_bytes());
            out.extend_from_slice(s.name.as_bytes());
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out
    }

    /// Finds a snapshot by ID first, then by name (as QEMU does).
    pub fn find<'a>(snaps: &'a [Snapshot], key: &str) -> Option<(usize, &'a Snapshot)> {
        snaps
            .iter()
            .enumerate()
            .find(|(_, s)| s.id == key)
            .or_else(|| snaps.iter().enumerate().find(|(_, s)| s.name == key))
    }
}
