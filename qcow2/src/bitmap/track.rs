//! Keeping persistent bitmaps right while an image is written.
//!
//! At a writable open, every consistent bitmap (not `in_use`), enabled
//! or not, is loaded into memory and marked `in_use` on disk before any
//! guest write, as QEMU does: a crash from then on leaves it marked
//! inconsistent, never silently wrong, and its old structures are never
//! read again (an image whose refcounts call them free may have them
//! overwritten by new data; the copy in memory is what gets stored). Every
//! guest write, write-zeroes, discard and deallocation sets the bits of
//! the enabled (`auto`) ones for the ranges it touches (atomic words under
//! a read lock; the metadata lock is not taken). At close the bitmaps are
//! stored: new data clusters and tables, a new directory, then one header
//! update switching to it with `in_use` clear; only after that header is
//! durable are the old structures freed, so a crash leaves leaks at most.
//!
//! Bitmaps found `in_use` (inconsistent) stay on disk as found: they can
//! only be removed ([`super::edit`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{encode_directory, entry, flags, BitmapError, BitmapsExt, DirEntry};
use crate::error::{Error, Result};
use crate::header::Header;
use crate::image::Image;
use crate::overlap::Allow;
use crate::qcow::Qcow2;
use crate::storage::Storage;

use super::read::{bad, loadable_table, table_ranges};
pub use super::read::{read_directory, read_table, references, validate, Referenced};
pub(crate) use super::words::Words;

/// A directory entry to store, with the bits and old table of a loaded
/// bitmap.
type Planned = (DirEntry, Option<(Words, Option<Vec<u64>>)>);

/// Where a bitmap's content is.
pub(crate) enum Content {
    /// An inconsistent bitmap (found `in_use`), on disk as found: written
    /// back as it is; its bits are never used.
    OnDisk,
    /// In memory; `old` is the table on disk (freed once the new one is
    /// in force).
    Loaded { words: Words, old: Option<Vec<u64>> },
}

/// One bitmap of the image as this session sees it.
pub(crate) struct Bitmap {
    /// The directory entry: the on-disk table and flags for `OnDisk`,
    /// the flags to store (without in use) for `Loaded`.
    pub(crate) entry: DirEntry,
    pub(crate) content: Content,
}

impl Bitmap {
    /// Tracks writes: loaded and enabled.
    pub(crate) fn tracks(&self) -> bool {
        matches!(self.content, Content::Loaded { .. }) && self.entry.auto()
    }
}

pub(crate) struct State {
    /// The extension as on disk (None: no bitmaps there).
    pub(crate) ext: Option<BitmapsExt>,
    pub(crate) bitmaps: Vec<Bitmap>,
    /// Structures of removed bitmaps, freed at the next store.
    pub(crate) removed: Vec<(u64, u64)>,
    /// Something is to be stored at close.
    pub(crate) changed: bool,
}

impl State {
    /// The directory to have on disk during the session: the bitmaps
    /// already there, every loaded one marked in use (its content is in
    /// memory and may change until the store).
    pub(crate) fn interim_directory(&self) -> Vec<DirEntry> {
        self.bitmaps
            .iter()
            .filter(|b| b.entry.table_offset != 0)
            .map(|b| {
                let mut e = b.entry.clone();
                if matches!(b.content, Content::Loaded { .. }) {
                    e.flags |= flags::IN_USE;
                }
                e
            })
            .collect()
    }
}

/// The bitmaps of a writable image (see the module docs).
pub struct Tracker {
    state: RwLock<State>,
    /// Some bitmap tracks writes (fast path for images without).
    tracking: AtomicBool,
    /// Stored: later writes could no longer be recorded.
    closed: AtomicBool,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("bitmaps", &self.read().bitmaps.len())
            .finish()
    }
}

/// Resizing needs every bitmap resized with the disk: all of them loaded
/// ([`Tracker::prepare_resize`]); otherwise an image with bitmaps is
/// refused (as QEMU refuses when a bitmap is not loaded).
pub fn check_resizable(t: Option<&Tracker>, h: &Header) -> Result<()> {
    if t.is_some_and(Tracker::resizable) {
        return Ok(());
    }
    match BitmapsExt::from_header(h) {
        Ok(None) => Ok(()),
        _ => Err(bad(BitmapError::Resize)),
    }
}

/// Loads the bitmap data of `d` (table `table`) for a disk of `size`.
pub(crate) fn load_words(
    st: &Storage,
    d: &DirEntry,
    table: &[u64],
    cs: u64,
    size: u64,
) -> Result<Words> {
    let bits = size.div_ceil(d.granularity());
    let words = Words::zeroed(bits);
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
            // Past the end of the file: zeros, as QEMU reads them.
            st.read_at(&mut buf, off)?;
        } else if e & entry::ALL_ONES != 0 {
            buf.fill(0xff);
        } else {
            continue;
        }
        // A cluster holds whole words (its size is a multiple of 8);
        // bytes past the bitmap's end are dropped (padding).
        buf[n..].fill(0);
        let first = (start / 8) as usize;
        for (k, b) in buf.chunks_exact(8).enumerate() {
            words.or_word(
                first + k,
                u64::from_le_bytes(b.try_into().expect("8 bytes")),
            );
        }
    }
    Ok(words)
}

/// Allocates clusters for `data`, writes it there and returns the
/// offset. The rest of the last cluster is not written (as QEMU does):
/// nothing reads past a table's or the directory's size.
fn write_new(q: &Qcow2, data: &[u8]) -> Result<u64> {
    let cs = q.cluster_size();
    let n = (data.len() as u64).div_ceil(cs).max(1);
    let st = q.storage();
    q.with_refcounts(|rc| {
        let off = rc.alloc(st, n)?;
        rc.overlap.write(st, data, off, Allow::NOTHING)?;
        Ok(off)
    })
}

/// Drops one reference to every cluster of each range. A range that
/// cannot be freed (past the end of the file, say) is left as it is: the
/// new structures are in force already, and QEMU only reports such a
/// failure and goes on.
fn free_ranges(q: &Qcow2, ranges: &[(u64, u64)]) -> Result<()> {
    let st = q.storage();
    q.with_refcounts(|rc| {
        for &(off, len) in ranges {
            if rc.update_range(st, off, len, -1, |_| {}).is_err() {
                // QEMU's refcount update refuses such a range with EINVAL.
                let e = Error::io("free", std::io::Error::from_raw_os_error(libc::EINVAL));
                st.report_swallowed("qcow2_free_clusters failed", &e);
            }
        }
        rc.flush(st)?;
        st.sync()
    })
}

/// Writes `dir` as a new directory (none when empty) and switches the
/// header to it; then frees the old directory and `also_free`.
pub(crate) fn switch_directory(
    q: &Qcow2,
    old: Option<BitmapsExt>,
    dir: &[DirEntry],
    also_free: &[(u64, u64)],
) -> Result<Option<BitmapsExt>> {
    let new = if dir.is_empty() {
        None
    } else {
        let raw = encode_directory(dir);
        let off = write_new(q, &raw)?;
        Some(BitmapsExt {
            nb_bitmaps: dir.len() as u32,
            directory_size: raw.len() as u64,
            directory_offset: off,
        })
    };
    // update_header flushes the refcounts of the new clusters (and syncs)
    // before the header names them.
    q.update_header(|h| {
        BitmapsExt::install(h, new);
        Ok(())
    })?;
    let mut frees: Vec<(u64, u64)> = old
        .map(|e| (e.directory_offset, e.directory_size))
        .into_iter()
        .collect();
    frees.extend_from_slice(also_free);
    free_ranges(q, &frees)?;
    Ok(new)
}

/// At a writable open (version 3): loads the consistent bitmaps and
/// marks them in use on disk.
pub fn load(q: &Qcow2) -> Result<Tracker> {
    let st = q.storage();
    let mut h = q.header();
    // An extension whose bit a program without bitmap support cleared is
    // dropped, as QEMU drops it (its clusters are leaks for check -r).
    let stale = |h: &Header| {
        !super::has_valid_bit(h)
            && h.other_extensions
                .iter()
                .any(|e| e.kind == crate::header::ext::BITMAPS)
    };
    if stale(&h) {
        q.update_header(|h| {
            BitmapsExt::install(h, None);
            Ok(())
        })?;
        h = q.header();
    }
    let (ext, dir) = match read_directory(st, &h)? {
        Some((e, d)) => (Some(e), d),
        None => (None, Vec::new()),
    };
    let cs = h.cluster_size();
    let mut bitmaps = Vec::new();
    for d in dir {
        if d.in_use() {
            bitmaps.push(Bitmap {
                entry: d,
                content: Content::OnDisk,
            });
            continue;
        }
        let words = load_checked(st, &d, cs, h.size)?;
        bitmaps.push(Bitmap {
            content: Content::Loaded {
                words: words.0,
                old: Some(words.1),
            },
            entry: d,
        });
    }
    let t = Tracker {
        state: RwLock::new(State {
            ext,
            bitmaps,
            removed: Vec::new(),
            changed: false,
        }),
        tracking: AtomicBool::new(false),
        closed: AtomicBool::new(false),
    };
    let mut s = t.write();
    if s.bitmaps
        .iter()
        .any(|b| matches!(b.content, Content::Loaded { .. }))
    {
        let dir = s.interim_directory();
        s.ext = switch_directory(q, s.ext, &dir, &[])?;
        s.changed = true;
        t.refresh_tracking(&s);
    }
    drop(s);
    Ok(t)
}

/// Checks the table size of `d` against the disk and loads its data.
pub(crate) fn load_checked(
    st: &Storage,
    d: &DirEntry,
    cs: u64,
    size: u64,
) -> Result<(Words, Vec<u64>)> {
    let table = loadable_table(st, d, cs, size)?;
    let words = load_words(st, d, &table, cs, size)?;
    Ok((words, table))
}

impl Tracker {
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().expect("bitmap state lock poisoned")
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().expect("bitmap state lock poisoned")
    }

    /// Whether a bitmap tracks writes now (after an edit).
    pub(crate) fn refresh_tracking(&self, s: &State) {
        self.tracking
            .store(s.bitmaps.iter().any(Bitmap::tracks), Ordering::Release);
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::InvalidArgument(
                "the persistent bitmaps were already stored".into(),
            ));
        }
        Ok(())
    }

    /// Sets the bits of every enabled bitmap for guest bytes
    /// [off, off + len). Fails once the bitmaps were stored: a write then
    /// would go unrecorded.
    pub fn mark(&self, off: u64, len: u64) -> Result<()> {
        if len == 0 || !self.tracking.load(Ordering::Acquire) {
            return Ok(());
        }
        // `closed` is read under the state lock and set under it by
        // `store`: a write either marks before the store copies the bits
        // or is refused, never recorded after the copy.
        let s = self.read();
        self.check_open()?;
        for b in s.bitmaps.iter().filter(|b| b.tracks()) {
            if let Content::Loaded { words, .. } = &b.content {
                let g = b.entry.granularity_bits;
                words.set(off >> g, (off + len - 1) >> g);
            }
        }
        Ok(())
    }

    /// The names of the bitmaps being tracked.
    pub fn live_names(&self) -> Vec<String> {
        let s = self.read();
        s.bitmaps
            .iter()
            .filter(|b| b.tracks())
            .map(|b| b.entry.name_str())
            .collect()
    }

    /// At close: stores the loaded bitmaps, clears their in-use flags and
    /// frees what was replaced or removed. Later writes are refused.
    ///
    /// Lock order: the metadata lock is taken before this state's (guest
    /// writes mark bits with it held), so the bits are taken out first
    /// and the I/O runs without it.
    pub fn store(&self, q: &Qcow2) -> Result<()> {
        let (old_ext, removed, plan) = {
            let mut s = self.write();
            if self.closed.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
            if !s.changed {
                return Ok(());
            }
            // `closed` is set: marks are refused from now on, so the words
            // are moved out, not copied (a bitmap may be hundreds of MiB).
            let plan: Vec<Planned> = s
                .bitmaps
                .iter_mut()
                .map(|b| {
                    let c = match &mut b.content {
                        Content::Loaded { words, old } => {
                            Some((std::mem::replace(words, Words::zeroed(0)), old.clone()))
                        }
                        Content::OnDisk => None,
                    };
                    (b.entry.clone(), c)
                })
                .collect();
            (s.ext, s.removed.clone(), plan)
        };
        let cs = q.cluster_size();
        let mut dir = Vec::with_capacity(plan.len());
        let mut frees = removed;
        for (mut d, content) in plan {
            if let Some((words, old)) = content {
                let table = store_data(q, &words)?;
                let mut raw = Vec::with_capacity(table.len() * 8);
                for e in &table {
                    raw.extend_from_slice(&e.to_be_bytes());
                }
                let off = write_new(q, &raw)?;
                if let Some(old) = old {
                    frees.extend(table_ranges(d.table_offset, &old, cs));
                }
                d.table_offset = off;
                d.table_size = table.len() as u32;
                d.flags &= !flags::IN_USE;
            }
            dir.push(d);
        }
        let new = switch_directory(q, old_ext, &dir, &frees)?;
        let mut s = self.write();
        s.ext = new;
        s.removed.clear();
        s.changed = false;
        Ok(())
    }

    /// Before a resize: every bitmap must be consistent (loaded since the
    /// open, hence marked in use on disk: a crash after the size changed
    /// leaves them inconsistent, never too small and valid).
    pub fn prepare_resize(&self) -> Result<()> {
        self.check_open()?;
        let mut s = self.write();
        if let Some(b) = s
            .bitmaps
            .iter()
            .find(|b| matches!(b.content, Content::OnDisk))
        {
            return Err(bad(BitmapError::Edit(format!(
                "Bitmap '{}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk",
                b.entry.name_str()
            ))));
        }
        if !s.bitmaps.is_empty() {
            s.changed = true;
        }
        Ok(())
    }

    /// Refuses to apply an internal snapshot while the image has bitmaps.
    pub fn refuse_snapshot_apply(&self) -> Result<()> {
        if self.read().bitmaps.is_empty() {
            Ok(())
        } else {
            Err(bad(BitmapError::ActiveBitmaps))
        }
    }

    /// Whether the image may be resized now (see [`Self::prepare_resize`]).
    pub fn resizable(&self) -> bool {
        let s = self.read();
        s.bitmaps
            .iter()
            .all(|b| matches!(b.content, Content::Loaded { .. }))
    }

    /// After the virtual size changed: bits are kept up to the new end,
    /// new granules are clean (as QEMU truncates its bitmaps).
    pub fn resize(&self, new_size: u64) {
        let mut s = self.write();
        for b in &mut s.bitmaps {
            if let Content::Loaded { words, .. } = &mut b.content {
                let bits = new_size.div_ceil(b.entry.granularity());
                *words = words.copy_resized(bits);
            }
        }
    }
}

/// Writes bitmap data into new clusters and returns its table: all-zero
/// clusters are left out, whole all-one clusters are flagged.
fn store_data(q: &Qcow2, w: &Words) -> Result<Vec<u64>> {
    let cs = q.cluster_size() as usize;
    let bytes = w.bits().div_ceil(8) as usize;
    // One cluster of the bitmap at a time: a huge bitmap is not copied
    // again as bytes (it may be hundreds of MiB).
    let mut chunk = vec![0u8; cs];
    let mut table = Vec::with_capacity(bytes.div_ceil(cs));
    for start in (0..bytes).step_by(cs) {
        let len = (bytes - start).min(cs);
        // Words are whole multiples of 8 bytes; a cluster holds whole words.
        let (w0, w1) = (start / 8, (start + len).div_ceil(8));
        // Most of a bitmap is usually clear: such clusters are skipped
        // by the summary, without reading (or mapping) their words.
        if !w.may_be_set(w0, w1) {
            table.push(0);
            continue;
        }
        for k in w0..w1 {
            let at = (k - w0) * 8;
            chunk[at..at + 8].copy_from_slice(&w.word(k).to_le_bytes());
        }
        // The last cluster is padded with zeros, as QEMU writes it:
        // readers load whole 64-bit words, so bits past the disk's end
        // must be clear.
        chunk[len..].fill(0);
        let e = if chunk.iter().all(|&x| x == 0) {
            0
        } else if len == cs && chunk.iter().all(|&x| x == 0xff) {
            entry::ALL_ONES
        } else {
            write_new(q, &chunk)?
        };
        table.push(e);
    }
    Ok(table)
}
