//! The internal snapshot table (qcow2.rst, "Snapshots").

use crate::error::{Error, Result};
use crate::header::Header;
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

/// What reading a snapshot table in repair mode had to leave out (QEMU's
/// limits; `check -r all` then writes the table back without it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableFixes {
    /// (entry index, extra data bytes) of entries whose extra data was over
    /// [`MAX_EXTRA_DATA`]: their unknown extra data is dropped.
    pub extra_dropped: Vec<(u32, u32)>,
    /// Entries dropped from the end because the table went past
    /// [`MAX_TABLE_BYTES`].
    pub overhanging: u32,
}

impl TableFixes {
    pub fn is_empty(&self) -> bool {
        self.extra_dropped.is_empty() && self.overhanging == 0
    }
}

impl Snapshot {
    /// Reads and validates the snapshot table named by the header; returns
    /// the entries and the table's length in bytes.
    pub fn read_table(st: &Storage, h: &Header) -> Result<(Vec<Snapshot>, u64)> {
        let (snaps, len, _) = Self::read_table_repairing(st, h, false)?;
        Ok((snaps, len))
    }

    /// As [`Snapshot::read_table`]; with `repair`, entries over QEMU's
    /// limits are cut down or left out (and listed) instead of refused,
    /// and the length returned is that of the entries kept, as on disk.
    pub fn read_table_repairing(
        st: &Storage,
        h: &Header,
        repair: bool,
    ) -> Result<(Vec<Snapshot>, u64, TableFixes)> {
        let mut out = Vec::with_capacity(h.nb_snapshots.min(1024) as usize);
        let mut fixes = TableFixes::default();
        let mut off = h.snapshots_offset;
        let mut limited = 0u64;
        let mut rd = Forward::new(st)?;
        for n in 0..h.nb_snapshots {
            let mut fixed = [0u8; 40];
            rd.read(&mut fixed, off)?;
            let be32 = |a: usize| u32::from_be_bytes(fixed[a..a + 4].try_into().unwrap());
            let be64 = |a: usize| u64::from_be_bytes(fixed[a..a + 8].try_into().unwrap());
            let l1_table_offset = be64(0);
            let l1_size = be32(8);
            let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as usize;
            let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
            let extra_len = be32(36);
            let end = off + 40 + extra_len as u64 + (id_len + name_len) as u64;
            // QEMU's limit applies to the table as it would write it back
            // (extra data cut to the limit), up to this entry's unpadded end.
            let limit_end =
                limited + 40 + extra_len.min(MAX_EXTRA_DATA) as u64 + (id_len + name_len) as u64;
            if limit_end > MAX_TABLE_BYTES {
                if !repair {
                    return Err(Error::snapshot_table_limit(format!(
                        "Snapshot table is too big\nYou can force-remove all {} overhanging snapshots with qemu-img check -r all",
                        h.nb_snapshots - n
                    )));
                }
                fixes.overhanging = h.nb_snapshots - n;
                break;
            }
            // Extra data kept: at most the known fields when over the limit.
            let kept_extra = if extra_len > MAX_EXTRA_DATA {
                if !repair {
                    return Err(Error::snapshot_table_limit(format!(
                        "Too much extra metadata in snapshot table entry {n}\nYou can force-remove this extra metadata with qemu-img check -r all"
                    )));
                }
                fixes.extra_dropped.push((n, extra_len));
                extra_len.min(24) as usize
            } else {
                extra_len as usize
            };
            // The L1 table's offset and size are checked where the table
            // is used (see `snapshot_l1`): QEMU opens such images.
            let mut extra = vec![0u8; kept_extra];
            rd.read(&mut extra, off + 40)?;
            let names_at = off + 40 + extra_len as u64;
            let id = rd.read_c_str(names_at, id_len)?;
            let name = rd.read_c_str(names_at + id_len as u64, name_len)?;
            let e64 = |a: usize| {
                (extra.len() >= a + 8)
                    .then(|| u64::from_be_bytes(extra[a..a + 8].try_into().unwrap()))
            };
            let vm_state_size = e64(0).unwrap_or(be32(32) as u64);
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
            off = end.next_multiple_of(8);
            limited = limit_end.next_multiple_of(8);
        }
        Ok((out, off - h.snapshots_offset, fixes))
    }

    /// Whether a version 3 image may hold this entry as it is: version 3
    /// requires the VM state size and disk size fields (16 bytes of extra
    /// data).
    pub fn complete_for_v3(&self) -> bool {
        self.disk_size.is_some()
    }

    /// Fills the fields an entry written by an older writer lacks, as QEMU
    /// reads them: the disk size is the image's, the icount -1 (unknown).
    pub fn fill_missing(&mut self, disk_size: u64) {
        self.disk_size.get_or_insert(disk_size);
        self.icount.get_or_insert(u64::MAX);
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
            // Callers fill these first (fill_missing); -1 is "unknown".
            extra.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
            extra.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
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

/// Reads a table front to back through a window, so that a table of
/// many small entries (up to 65536 snapshots) costs a read of the file
/// per window rather than three per entry. Small windows: a hostile
/// table's entries may each jump far ahead. Under fault injection each
/// read goes to the file as asked, as QEMU reads each field.
struct Forward<'a> {
    st: &'a Storage,
    /// The file's length, once: reads past it are zeros.
    len: u64,
    window: Vec<u8>,
    /// The file offset of `window[0]`.
    at: u64,
}

impl<'a> Forward<'a> {
    const WINDOW: u64 = 4096;

    fn new(st: &'a Storage) -> Result<Self> {
        Ok(Forward {
            st,
            len: st.len()?,
            window: Vec::new(),
            at: 0,
        })
    }

    /// Whether `n` bytes at `off` read as zeros without a read: past the
    /// end of the file, not past what pread takes (there it fails).
    fn zeros_at(&self, off: u64, n: usize) -> bool {
        off >= self.len
            && off
                .checked_add(n as u64)
                .is_some_and(|e| e <= i64::MAX as u64)
            && !self.st.has_faults()
    }

    /// The `len` bytes at `off` as QEMU keeps them, a C string: up to
    /// the first NUL. Read a window at a time up to that NUL only: a
    /// hostile entry's names may claim 64 KiB each.
    fn read_c_str(&mut self, off: u64, len: usize) -> Result<String> {
        let mut bytes = Vec::new();
        if self.st.has_faults() {
            bytes.resize(len, 0);
            self.st.read_at(&mut bytes, off)?;
        } else {
            // Straight into `bytes`, a window's worth at a time: no
            // buffer zeroed per name (twice per entry of a table that may
            // hold 65536, mostly empty).
            let mut done = 0;
            while done < len && !self.zeros_at(off + done as u64, len - done) {
                let n = (len - done).min(Self::WINDOW as usize);
                bytes.resize(done + n, 0);
                self.read(&mut bytes[done..], off + done as u64)?;
                let nul = bytes[done..].contains(&0);
                done += n;
                if nul {
                    break;
                }
            }
        }
        let end = bytes.iter().position(|&c| c == 0).unwrap_or(bytes.len());
        Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
    }

    fn read(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if self.zeros_at(off, buf.len()) {
            // Past the end of the file: zeros, as every read there gives.
            buf.fill(0);
            return Ok(());
        }
        if buf.len() as u64 > Self::WINDOW || self.st.has_faults() {
            return self.st.read_at(buf, off);
        }
        let have = off >= self.at
            && off.saturating_add(buf.len() as u64)
                <= self.at.saturating_add(self.window.len() as u64);
        if !have {
            let left = (self.len - off).min(Self::WINDOW);
            self.window.resize((left as usize).max(buf.len()), 0);
            self.st.read_at(&mut self.window, off)?;
            self.at = off;
        }
        let from = (off - self.at) as usize;
        buf.copy_from_slice(&self.window[from..from + buf.len()]);
        Ok(())
    }
}
