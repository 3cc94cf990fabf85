//! Keeping persistent bitmaps right while an image is written.
//!
//! At a writable open, every enabled (`auto`) bitmap that is consistent
//! (not `in_use`) is loaded into memory and marked `in_use` on disk before
//! any guest write: a crash from then on leaves it marked inconsistent,
//! never silently wrong. Every guest write, write-zeroes, discard and
//! deallocation sets the bits of the ranges it touches (lock-free, atomic
//! words: no metadata lock is taken for it). At close the bitmaps are
//! stored: new data clusters and tables, a new directory, then one header
//! update switching to it with `in_use` clear; only after that header is
//! durable are the old structures freed, so a crash leaves leaks at most.
//!
//! Disabled bitmaps and bitmaps found `in_use` are left as they are.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{
    encode_directory, entry, flags, parse_directory, parse_table, table_size_for, BitmapError,
    BitmapsExt, DirEntry,
};
use crate::error::{Error, Result};
use crate::header::Header;
use crate::image::Image;
use crate::overlap::Allow;
use crate::qcow::Qcow2;
use crate::storage::Storage;

/// An enabled bitmap held in memory while the image is open.
struct Live {
    /// Index in the directory.
    index: usize,
    granularity_bits: u8,
    /// Bit k (LSB first, as the on-disk data) is the k-th granule.
    words: Vec<AtomicU64>,
    /// Number of granules.
    bits: u64,
    /// The table and data clusters on disk at open (freed once the new
    /// ones are in force).
    old_table: Vec<u64>,
}

/// The bitmaps of a writable image (see the module docs).
pub struct Tracker {
    /// The directory as on disk (the live bitmaps marked in use).
    dir: Vec<DirEntry>,
    ext: BitmapsExt,
    live: Vec<Live>,
    /// Stored: later writes could no longer be recorded.
    closed: AtomicBool,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("bitmaps", &self.dir.len())
            .field("live", &self.live.len())
            .finish()
    }
}

fn bad(e: BitmapError) -> Error {
    Error::Bitmap(e)
}

/// Reads `len` bytes at `off`, refusing ranges past the end of the file.
fn read_in_file(st: &Storage, off: u64, len: u64, past_end: BitmapError) -> Result<Vec<u8>> {
    let file_len = st.len()?;
    if off.checked_add(len).is_none_or(|e| e > file_len) {
        return Err(bad(past_end));
    }
    let mut buf = vec![0u8; len as usize];
    st.read_at(&mut buf, off)?;
    Ok(buf)
}

/// The bitmap directory of the image, if its bitmaps count (see
/// [`BitmapsExt::from_header`]), parsed and checked.
pub fn read_directory(st: &Storage, h: &Header) -> Result<Option<(BitmapsExt, Vec<DirEntry>)>> {
    let Some(e) = BitmapsExt::from_header(h).map_err(bad)? else {
        return Ok(None);
    };
    if e.directory_size == 0 {
        return Err(bad(BitmapError::DirectoryEmpty));
    }
    let buf = read_in_file(
        st,
        e.directory_offset,
        e.directory_size,
        BitmapError::DirectoryPastEnd {
            offset: e.directory_offset,
            size: e.directory_size,
        },
    )?;
    let dir = parse_directory(&buf, &e, h.cluster_size(), h.size).map_err(bad)?;
    Ok(Some((e, dir)))
}

/// Reads and checks the bitmap table of `d`.
pub fn read_table(st: &Storage, d: &DirEntry, cluster_size: u64) -> Result<Vec<u64>> {
    let buf = read_in_file(
        st,
        d.table_offset,
        d.table_size as u64 * 8,
        BitmapError::TablePastEnd(d.name_str()),
    )?;
    parse_table(&buf, d, cluster_size).map_err(bad)
}

/// What the bitmaps reference, for `check`: (offset, length) of the
/// directory, every table and every data cluster, and the problems found
/// (each one a corruption, in qemu-img's terms).
pub fn references(st: &Storage, h: &Header) -> (Vec<(u64, u64)>, Vec<String>) {
    let mut refs = Vec::new();
    let mut errs = Vec::new();
    let e = match BitmapsExt::from_header(h) {
        Ok(Some(e)) => e,
        Ok(None) => return (refs, errs),
        Err(err) => {
            errs.push(format!("ERROR bitmaps extension: {err}"));
            return (refs, errs);
        }
    };
    refs.push((e.directory_offset, e.directory_size));
    let dir = match read_directory(st, h) {
        Ok(Some((_, d))) => d,
        Ok(None) => return (refs, errs),
        Err(err) => {
            errs.push(format!("ERROR bitmap directory: {err}"));
            return (refs, errs);
        }
    };
    let cs = h.cluster_size();
    for d in &dir {
        refs.push((d.table_offset, d.table_size as u64 * 8));
        let table = match read_table(st, d, cs) {
            Ok(t) => t,
            Err(err) => {
                errs.push(format!("ERROR bitmap table: {err}"));
                // As qemu-img: one bad table ends the bitmap walk.
                break;
            }
        };
        refs.extend(
            table
                .iter()
                .map(|t| t & entry::OFFSET)
                .filter(|&o| o != 0)
                .map(|o| (o, cs)),
        );
    }
    (refs, errs)
}

/// Resizing needs every bitmap resized with the disk; rimg keeps only
/// enabled bitmaps in memory, so an image with any bitmap is refused (as
/// QEMU refuses when a bitmap is not loaded or is inconsistent).
pub fn check_resizable(h: &Header) -> Result<()> {
    match BitmapsExt::from_header(h) {
        Ok(None) => Ok(()),
        _ => Err(bad(BitmapError::Resize)),
    }
}

impl Tracker {
    /// Sets the bits of every enabled bitmap for guest bytes
    /// [off, off + len). Fails once the bitmaps were stored: a write then
    /// would go unrecorded.
    pub fn mark(&self, off: u64, len: u64) -> Result<()> {
        if len == 0 || self.live.is_empty() {
            return Ok(());
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::InvalidArgument(
                "write after the persistent bitmaps were stored".into(),
            ));
        }
        for b in &self.live {
            let first = off >> b.granularity_bits;
            let last = ((off + len - 1) >> b.granularity_bits).min(b.bits.saturating_sub(1));
            if first > last {
                continue;
            }
            set_bits(&b.words, first, last);
        }
        Ok(())
    }

    /// The names of the bitmaps being tracked.
    pub fn live_names(&self) -> Vec<String> {
        self.live
            .iter()
            .map(|b| self.dir[b.index].name_str())
            .collect()
    }
}

/// Sets bits [first, last] of `words`.
fn set_bits(words: &[AtomicU64], first: u64, last: u64) {
    let (w0, w1) = ((first / 64) as usize, (last / 64) as usize);
    for (w, word) in words.iter().enumerate().take(w1 + 1).skip(w0) {
        let lo = if w == w0 { first % 64 } else { 0 };
        let hi = if w == w1 { last % 64 } else { 63 };
        let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
        word.fetch_or(mask, Ordering::Relaxed);
    }
}

/// Loads the bitmap data of `d` (table `table`) into words.
fn load_words(st: &Storage, d: &DirEntry, table: &[u64], cs: u64, bits: u64) -> Result<Vec<u64>> {
    let nwords = bits.div_ceil(64) as usize;
    let mut words = vec![0u64; nwords];
    let bytes = bits.div_ceil(8);
    let mut buf = vec![0u8; cs as usize];
    for (i, &e) in table.iter().enumerate() {
        let start = i as u64 * cs;
        if start >= bytes {
            break;
        }
        let n = (bytes - start).min(cs) as usize;
        let off = e & entry::OFFSET;
        if off != 0 {
            let past = BitmapError::TableEntry {
                name: d.name_str(),
                index: i,
                entry: e,
            };
            buf = read_in_file(st, off, cs, past)?;
        } else if e & entry::ALL_ONES != 0 {
            buf.fill(0xff);
        } else {
            continue;
        }
        for (k, &byte) in buf[..n].iter().enumerate() {
            let j = start as usize + k;
            words[j / 8] |= (byte as u64) << ((j % 8) * 8);
        }
    }
    // Bits past the disk's end are padding.
    if !bits.is_multiple_of(64) {
        if let Some(w) = words.last_mut() {
            *w &= (1u64 << (bits % 64)) - 1;
        }
    }
    Ok(words)
}

/// Allocates clusters for `data` (padded to whole clusters), writes it
/// there and returns the offset.
fn write_new(q: &Qcow2, data: &[u8]) -> Result<u64> {
    let cs = q.cluster_size();
    let n = (data.len() as u64).div_ceil(cs).max(1);
    let mut buf = data.to_vec();
    buf.resize((n * cs) as usize, 0);
    let st = q.storage();
    q.with_meta(|ctx| {
        let off = ctx.rc.alloc(st, n)?;
        ctx.rc.overlap.write(st, &buf, off, Allow::NOTHING)?;
        Ok(off)
    })
}

/// Drops one reference to every cluster of each range.
fn free_ranges(q: &Qcow2, ranges: &[(u64, u64)]) -> Result<()> {
    let st = q.storage();
    q.with_meta(|ctx| {
        for &(off, len) in ranges {
            ctx.rc.update_range(st, off, len, -1, |_| {})?;
        }
        ctx.rc.flush(st)?;
        st.sync()
    })
}

/// Writes `dir` as a new directory and switches the header to it; then
/// frees the old directory and `also_free`.
fn switch_directory(
    q: &Qcow2,
    old: &BitmapsExt,
    dir: &[DirEntry],
    also_free: &[(u64, u64)],
) -> Result<BitmapsExt> {
    let raw = encode_directory(dir);
    let off = write_new(q, &raw)?;
    let new = BitmapsExt {
        nb_bitmaps: dir.len() as u32,
        directory_size: raw.len() as u64,
        directory_offset: off,
    };
    // update_header flushes the refcounts of the new clusters (and syncs)
    // before the header names them.
    q.update_header(|h| {
        BitmapsExt::install(h, Some(new));
        Ok(())
    })?;
    let mut frees = vec![(old.directory_offset, old.directory_size)];
    frees.extend_from_slice(also_free);
    free_ranges(q, &frees)?;
    Ok(new)
}

/// At a writable open: loads the enabled, consistent bitmaps and marks
/// them in use on disk. None when there is nothing to track.
pub fn load(q: &Qcow2) -> Result<Option<Tracker>> {
    let st = q.storage();
    let h = q.header();
    let Some((ext, mut dir)) = read_directory(st, &h)? else {
        return Ok(None);
    };
    let cs = h.cluster_size();
    let mut live = Vec::new();
    for (index, d) in dir.iter().enumerate() {
        if d.in_use() || !d.auto() {
            continue;
        }
        let want = table_size_for(h.size, d.granularity_bits, cs);
        if want != d.table_size as u64 {
            return Err(bad(BitmapError::TableSize {
                name: d.name_str(),
                have: d.table_size,
                want,
            }));
        }
        let table = read_table(st, d, cs)?;
        let bits = h.size.div_ceil(d.granularity());
        let words = load_words(st, d, &table, cs, bits)?;
        live.push(Live {
            index,
            granularity_bits: d.granularity_bits,
            words: words.into_iter().map(AtomicU64::new).collect(),
            bits,
            old_table: table,
        });
    }
    if live.is_empty() {
        return Ok(None);
    }
    for b in &live {
        dir[b.index].flags |= flags::IN_USE;
    }
    let ext = switch_directory(q, &ext, &dir, &[])?;
    Ok(Some(Tracker {
        dir,
        ext,
        live,
        closed: AtomicBool::new(false),
    }))
}

/// Writes the bitmap data of `b` into new clusters and returns its table.
fn store_data(q: &Qcow2, b: &Live) -> Result<Vec<u64>> {
    let cs = q.cluster_size();
    let bytes = b.bits.div_ceil(8);
    let mut data = Vec::with_capacity(b.words.len() * 8);
    for w in &b.words {
        data.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
    }
    data.truncate(bytes as usize);
    let mut table = Vec::new();
    for chunk in data.chunks(cs as usize) {
        let e = if chunk.iter().all(|&x| x == 0) {
            0
        } else if chunk.len() as u64 == cs && chunk.iter().all(|&x| x == 0xff) {
            entry::ALL_ONES
        } else {
            write_new(q, chunk)?
        };
        table.push(e);
    }
    Ok(table)
}

/// The clusters a bitmap table and its data use.
fn table_ranges(table_offset: u64, table: &[u64], cs: u64) -> Vec<(u64, u64)> {
    let mut r = vec![(table_offset, table.len() as u64 * 8)];
    r.extend(
        table
            .iter()
            .map(|e| e & entry::OFFSET)
            .filter(|&o| o != 0)
            .map(|o| (o, cs)),
    );
    r
}

/// At close: stores the tracked bitmaps and clears their in-use flags.
/// Later writes are refused by [`Tracker::mark`].
pub fn store(q: &Qcow2, t: &Tracker) -> Result<()> {
    if t.closed.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    let cs = q.cluster_size();
    let mut dir = t.dir.clone();
    let mut frees = Vec::new();
    for b in &t.live {
        let table = store_data(q, b)?;
        let mut raw = Vec::with_capacity(table.len() * 8);
        for e in &table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        let off = write_new(q, &raw)?;
        let d = &mut dir[b.index];
        frees.extend(table_ranges(d.table_offset, &b.old_table, cs));
        d.table_offset = off;
        d.table_size = table.len() as u32;
        d.flags &= !flags::IN_USE;
    }
    switch_directory(q, &t.ext, &dir, &frees)?;
    Ok(())
}
