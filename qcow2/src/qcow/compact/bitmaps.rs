//! Moving the persistent bitmaps' clusters (qcow2.rst, "Bitmaps
//! extension"): data clusters, named by their bitmap table's entries;
//! tables, named by the directory's entries; the directory, named by the
//! header extension. Each is one cluster's move with the same four steps
//! as the rest of a batch; a level's pointers are written only once what
//! they point at is durable, so after a kill every pointer names either
//! the old copy or the new one, both complete and counted.
//!
//! Only bitmaps left on disk (`Qcow2Options::bitmaps_on_disk`) move: a
//! loaded bitmap's tracker remembers where its clusters were and frees
//! those when it stores the bitmap.

use std::collections::BTreeMap;

use super::*;
use crate::bitmap::track::{read_directory, read_table};
use crate::bitmap::{entry, BitmapsExt, DirEntry};
use crate::header::ext;
use crate::pagebuf::PageBuf;

/// The bitmaps as they are on disk: the extension, the directory's
/// entries, and each entry's table.
struct OnDisk {
    ext: BitmapsExt,
    dir: Vec<DirEntry>,
    tables: Vec<Vec<u64>>,
}

fn read(st: &Storage, h: &Header) -> Result<Option<OnDisk>> {
    let Some((ext, dir)) = read_directory(st, h)? else {
        return Ok(None);
    };
    let cs = h.cluster_size();
    let tables = dir
        .iter()
        .map(|d| read_table(st, d, cs))
        .collect::<Result<_>>()?;
    Ok(Some(OnDisk { ext, dir, tables }))
}

/// Notes `Refs::One` for a structure of one cluster, else pins every
/// cluster it covers (moving it would need a free run as long).
fn note_range(note: &mut dyn FnMut(u64, Refs), off: u64, len: u64, cb: u32, owner: Owner) {
    if len <= 1 << cb {
        note(off >> cb, Refs::One(owner));
    } else {
        for c in off >> cb..=(off + len - 1) >> cb {
            note(c, Refs::Pinned);
        }
    }
}

/// The bitmap parts of one batch: per bitmap, its table's new place (if
/// it moves) and its entries (index, new offset) whose data moves; and
/// the directory's new place.
#[derive(Default)]
pub(super) struct BitmapEdits {
    pub(super) tables: BTreeMap<usize, TableEdit>,
    pub(super) directory: Option<u64>,
}

impl BitmapEdits {
    pub(super) fn new(moves: &[Move], cb: u32) -> BitmapEdits {
        let mut e = BitmapEdits::default();
        for mv in moves {
            match mv.owner {
                Owner::BitmapTable { bitmap } => {
                    e.tables.entry(bitmap).or_default().0 = Some(mv.to << cb)
                }
                Owner::BitmapData { bitmap, idx } => e
                    .tables
                    .entry(bitmap)
                    .or_default()
                    .1
                    .push((idx, mv.to << cb)),
                Owner::BitmapDirectory => e.directory = Some(mv.to << cb),
                _ => {}
            }
        }
        e
    }

    /// Whether a table or the directory moves: the level above them
    /// is rewritten.
    pub(super) fn repoints(&self) -> bool {
        self.directory.is_some() || self.tables.values().any(|(to, _)| to.is_some())
    }
}

/// `data` in a page-aligned buffer: a kill cannot cut a write from it
/// inside a sector (see `pagebuf`).
fn aligned(data: &[u8]) -> PageBuf {
    let mut b = PageBuf::zeroed(data.len());
    b.copy_from_slice(data);
    b
}

fn gone() -> Error {
    Error::Corrupt("the bitmaps to move changed during the compaction".into())
}

impl Qcow2 {
    /// Notes the bitmaps' clusters for `compact_plan`, unless the bitmaps
    /// are loaded (then they stay where they are).
    pub(super) fn note_bitmaps(&self, m: &Meta, note: &mut dyn FnMut(u64, Refs)) -> Result<()> {
        if !self.opts.bitmaps_on_disk || self.bitmaps.get().is_some() {
            return Ok(());
        }
        let Some(b) = read(&self.st, &m.header)? else {
            return Ok(());
        };
        let cb = self.cluster_bits;
        let e = &b.ext;
        note_range(
            note,
            e.directory_offset,
            e.directory_size,
            cb,
            Owner::BitmapDirectory,
        );
        for (bitmap, (d, table)) in b.dir.iter().zip(&b.tables).enumerate() {
            let owner = Owner::BitmapTable { bitmap };
            note_range(note, d.table_offset, d.table_size as u64 * 8, cb, owner);
            for (idx, &t) in table.iter().enumerate() {
                let off = t & entry::OFFSET;
                if off != 0 {
                    note(off >> cb, Refs::One(Owner::BitmapData { bitmap, idx }));
                }
            }
        }
        Ok(())
    }

    /// Step 3, first part: every table with moved data or moving itself,
    /// written whole with the new entries to its new place (or in place).
    pub(super) fn write_bitmap_tables(&self, m: &Meta, e: &BitmapEdits) -> Result<()> {
        if e.tables.is_empty() {
            return Ok(());
        }
        let Some((_, dir)) = read_directory(&self.st, &m.header)? else {
            return Err(gone());
        };
        for (&i, (to, entries)) in &e.tables {
            let d = dir.get(i).ok_or_else(gone)?;
            let table = read_table(&self.st, d, self.cluster_size())?;
            let mut raw: Vec<u8> = table.iter().flat_map(|t| t.to_be_bytes()).collect();
            for &(idx, host) in entries {
                let t = (table[idx] & !entry::OFFSET) | host;
                raw[idx * 8..idx * 8 + 8].copy_from_slice(&t.to_be_bytes());
            }
            self.st
                .write_at(&aligned(&raw), to.unwrap_or(d.table_offset))?;
        }
        Ok(())
    }

    /// Step 3, second part (the tables are durable): the directory with
    /// the moved tables' offsets, to its new place or in place.
    pub(super) fn write_bitmap_directory(&self, m: &Meta, e: &BitmapEdits) -> Result<()> {
        let moved = e.tables.iter().any(|(_, (to, _))| to.is_some());
        if !moved && e.directory.is_none() {
            return Ok(());
        }
        let Some((x, dir)) = read_directory(&self.st, &m.header)? else {
            return Err(gone());
        };
        let mut raw = PageBuf::zeroed(x.directory_size as usize);
        self.st.read_at(&mut raw, x.directory_offset)?;
        // Entries as parse_directory found them: back to back, each
        // padded to 8 bytes, the table offset first (checked, so that a
        // change there cannot make this write a wrong field).
        let mut at = 0;
        for (i, d) in dir.iter().enumerate() {
            let field = raw.get(at..at + 8).ok_or_else(gone)?;
            if u64::from_be_bytes(field.try_into().unwrap()) != d.table_offset {
                return Err(gone());
            }
            if let Some((Some(to), _)) = e.tables.get(&i) {
                raw[at..at + 8].copy_from_slice(&to.to_be_bytes());
            }
            at += d.encoded_len();
        }
        if at != raw.len() {
            return Err(gone());
        }
        self.st
            .write_at(&raw, e.directory.unwrap_or(x.directory_offset))
    }

    /// Step 3, last part (the new directory is durable): the header
    /// extension's directory offset (qcow2.rst, "Bitmaps extension":
    /// bytes 16-23 of its data) pointed at the new place. Only those 8
    /// bytes are written: the rest of the header stays as it is on disk.
    pub(super) fn switch_bitmap_directory(&self, m: &mut Meta, to: u64) -> Result<()> {
        let Some(mut x) = BitmapsExt::from_header(&m.header).map_err(Error::Bitmap)? else {
            return Err(gone());
        };
        let at = self.bitmaps_ext_on_disk()? + 16;
        let mut old = [0u8; 8];
        self.st.read_at(&mut old, at)?;
        if u64::from_be_bytes(old) != x.directory_offset {
            return Err(gone());
        }
        m.rc.overlap
            .write(&self.st, &to.to_be_bytes(), at, Allow::only(Kind::Header))?;
        self.st.sync()?;
        x.directory_offset = to;
        if let Some(e) = m
            .header
            .other_extensions
            .iter_mut()
            .find(|e| e.kind == ext::BITMAPS)
        {
            e.data = x.encode();
        }
        // The overlap map guards the directory where it is now.
        Self::refresh_map(m);
        Ok(())
    }

    /// Where the bitmaps extension's data begins in the file: its
    /// extension header found by walking the extensions from
    /// `header_length` (qcow2.rst, "Header extensions").
    fn bitmaps_ext_on_disk(&self) -> Result<u64> {
        let cs = self.cluster_size() as usize;
        let mut first = PageBuf::zeroed(cs);
        self.st.read_at(&mut first, 0)?;
        let be32 = |at: usize| u32::from_be_bytes(first[at..at + 4].try_into().unwrap());
        let mut at = be32(100) as usize;
        while at + 8 <= cs {
            let (kind, len) = (be32(at), be32(at + 4) as usize);
            if kind == ext::BITMAPS && at + 8 + len <= cs {
                return Ok(at as u64 + 8);
            }
            if kind == ext::END {
                break;
            }
            at += 8 + len.next_multiple_of(8);
        }
        Err(gone())
    }
}
