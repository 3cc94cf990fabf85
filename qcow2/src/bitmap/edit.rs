//! Edits of a writable image's bitmaps (`qemu-img bitmap`): add, remove,
//! clear, enable, disable, merge. Edits change the session's state; the
//! store at close writes them (new structures, one header switch, then
//! the old ones freed), so a crash before that leaves the image as it was.
//! Error messages are QEMU's.

use super::read::bad;
use super::track::{load_checked, read_directory, Bitmap, Content, State, Tracker, Words};
use super::{check_new_bitmap, flags, BitmapError, DirEntry, MAX_BITMAPS, MAX_DIRECTORY_SIZE};

use crate::error::Result;
use crate::image::Image;
use crate::qcow::Qcow2;

fn edit(msg: impl Into<String>) -> crate::error::Error {
    bad(BitmapError::Edit(msg.into()))
}

fn not_found(name: &str) -> crate::error::Error {
    edit(format!("Dirty bitmap '{name}' not found"))
}

fn inconsistent(name: &str) -> crate::error::Error {
    edit(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}

/// The default granularity of a new bitmap: the cluster size, within
/// [4 KiB, 64 KiB].
pub fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

/// A bitmap's bits and granularity, for a merge.
pub struct Source {
    granularity_bits: u8,
    words: Words,
    disk_size: u64,
    /// The bitmap records writes (its auto flag): it changes while the
    /// image is written.
    enabled: bool,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("granularity_bits", &self.granularity_bits)
            .field("granules", &self.words.bits())
            .field("enabled", &self.enabled)
            .finish()
    }
}

impl Source {
    /// Whether the bitmap records writes.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the granule holding guest offset `off` is dirty, and for
    /// how many of the `len` bytes from `off` (at least one) that stays
    /// so, whole granules at a time: QEMU's dirty-bitmap block status.
    pub fn dirty_run(&self, off: u64, len: u64) -> (bool, u64) {
        let g = self.granularity_bits;
        let end = off
            .saturating_add(len.max(1))
            .min(self.disk_size.max(off + 1));
        let bit = |k: u64| self.words.word((k / 64) as usize) >> (k % 64) & 1 == 1;
        let first = off >> g;
        let dirty = bit(first);
        let last = (end - 1) >> g;
        let mut k = first + 1;
        while k <= last {
            if k.is_multiple_of(64) && k + 63 <= last {
                let i = (k / 64) as usize;
                // Clear pages of words at once (the summary), then a
                // whole word of the same state at once.
                if !dirty {
                    let next = self.words.next_maybe_set(i) as u64 * 64;
                    if next > k {
                        k = next.min(last + 1) & !63;
                        continue;
                    }
                }
                if self.words.word(i) == if dirty { u64::MAX } else { 0 } {
                    k += 64;
                    continue;
                }
            }
            if bit(k) != dirty {
                break;
            }
            k += 1;
        }
        let run_end = (k << g).min(end);
        (dirty, run_end - off)
    }
}

impl State {
    fn find(&self, name: &str) -> Option<usize> {
        self.bitmaps
            .iter()
            .position(|b| b.entry.name == name.as_bytes())
    }

    /// A consistent bitmap: loaded since the open (or added since).
    fn find_usable(&self, name: &str) -> Result<usize> {
        let i = self.find(name).ok_or_else(|| not_found(name))?;
        match self.bitmaps[i].content {
            Content::OnDisk => Err(inconsistent(name)),
            Content::Loaded { .. } => Ok(i),
        }
    }

    fn words(&self, i: usize) -> &Words {
        match &self.bitmaps[i].content {
            Content::Loaded { words, .. } => words,
            Content::OnDisk => unreachable!("find_usable returns loaded bitmaps only"),
        }
    }

    fn words_mut(&mut self, i: usize) -> &mut Words {
        match &mut self.bitmaps[i].content {
            Content::Loaded { words, .. } => words,
            Content::OnDisk => unreachable!("find_usable returns loaded bitmaps only"),
        }
    }
}

impl Tracker {
    /// Adds an empty bitmap (enabled unless `disabled`). `granularity`
    /// None: the default.
    pub fn add(
        &self,
        q: &Qcow2,
        name: &str,
        granularity: Option<u64>,
        disabled: bool,
    ) -> Result<()> {
        self.check_open()?;
        if name.is_empty() {
            return Err(edit("Bitmap name cannot be empty"));
        }
        let g = match granularity {
            // QEMU takes the granularity as 32 bits.
            Some(g) => {
                let g = g as u32 as u64;
                if g < 512 || !g.is_power_of_two() {
                    return Err(edit("Granularity must be power of 2 and at least 512"));
                }
                g
            }
            None => default_granularity(q.cluster_size()),
        };
        // Read before the state lock (lock order: metadata first).
        let version = q.header().version;
        let mut s = self.write();
        if s.find(name).is_some() {
            return Err(edit(format!("Bitmap already exists: {name}")));
        }
        let refuse = |why: String| {
            edit(format!(
                "Can't make bitmap '{name}' persistent in '{}': {why}",
                q.path().display()
            ))
        };
        if version < 3 {
            return Err(refuse(
                "Cannot store dirty bitmaps in qcow2 v2 files".into(),
            ));
        }
        check_new_bitmap(name, g, q.size(), q.cluster_size()).map_err(refuse)?;
        // A bitmap table cannot be empty: QEMU fails to store one too.
        if q.size() == 0 {
            return Err(refuse("the disk is empty (0 bytes)".into()));
        }
        let entry = DirEntry {
            table_offset: 0,
            table_size: 0,
            flags: if disabled { 0 } else { flags::AUTO },
            granularity_bits: g.trailing_zeros() as u8,
            name: name.as_bytes().to_vec(),
        };
        let dir_size: u64 = s
            .bitmaps
            .iter()
            .map(|b| b.entry.encoded_len() as u64)
            .sum::<u64>()
            + entry.encoded_len() as u64;
        if s.bitmaps.len() as u32 >= MAX_BITMAPS {
            return Err(refuse(
                "Maximum number of persistent bitmaps is already reached".into(),
            ));
        }
        if dir_size > MAX_DIRECTORY_SIZE {
            return Err(refuse("Not enough space in the bitmap directory".into()));
        }
        let bits = q.size().div_ceil(g);
        s.bitmaps.push(Bitmap {
            entry,
            content: Content::Loaded {
                words: Words::zeroed(bits),
                old: None,
            },
        });
        s.changed = true;
        self.refresh_tracking(&s);
        Ok(())
    }

    /// Removes a bitmap (inconsistent ones too); its clusters are freed
    /// at the store.
    pub fn remove(&self, q: &Qcow2, name: &str) -> Result<()> {
        self.check_open()?;
        let mut s = self.write();
        let i = s.find(name).ok_or_else(|| not_found(name))?;
        let b = s.bitmaps.remove(i);
        let cs = q.cluster_size();
        let old = match b.content {
            Content::Loaded { old, .. } => old,
            // An unreadable table of an inconsistent bitmap: the table and
            // its data clusters leak (check -r frees them), as in QEMU.
            Content::OnDisk => super::track::read_table(q.storage(), &b.entry, cs).ok(),
        };
        if let (true, Some(old)) = (b.entry.table_offset != 0, old) {
            s.removed
                .push((b.entry.table_offset, b.entry.table_size as u64 * 8));
            for e in old {
                let off = e & super::entry::OFFSET;
                if off != 0 {
                    s.removed.push((off, cs));
                }
            }
        }
        s.changed = true;
        self.refresh_tracking(&s);
        Ok(())
    }

    /// Clears every bit of a bitmap.
    pub fn clear(&self, name: &str) -> Result<()> {
        self.check_open()?;
        let mut s = self.write();
        let i = s.find_usable(name)?;
        s.words_mut(i).clear();
        s.changed = true;
        Ok(())
    }

    /// Enables (tracks writes) or disables a bitmap. It is marked in use
    /// on disk already (every loaded bitmap is, from the open on): a
    /// crash leaves it inconsistent, never missing writes.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.check_open()?;
        let mut s = self.write();
        let i = s.find_usable(name)?;
        if enabled {
            s.bitmaps[i].entry.flags |= flags::AUTO;
        } else {
            s.bitmaps[i].entry.flags &= !flags::AUTO;
        }
        s.changed = true;
        self.refresh_tracking(&s);
        Ok(())
    }

    /// A bitmap of this image, for a merge.
    pub fn source(&self, q: &Qcow2, name: &str) -> Result<Source> {
        let s = self.read();
        let i = s.find_usable(name)?;
        Ok(Source {
            granularity_bits: s.bitmaps[i].entry.granularity_bits,
            words: s.words(i).snapshot(),
            disk_size: q.size(),
            enabled: s.bitmaps[i].entry.flags & flags::AUTO != 0,
        })
    }

    /// Sets in bitmap `dst` every range dirty in `src`.
    pub fn merge(&self, q: &Qcow2, dst: &str, src: &Source) -> Result<()> {
        self.check_open()?;
        let mut s = self.write();
        let i = s.find_usable(dst)?;
        if src.disk_size != q.size() {
            return Err(edit("Bitmaps are incompatible and can't be merged"));
        }
        let words = s.words(i);
        let gd = s.bitmaps[i].entry.granularity_bits;
        let gs = src.granularity_bits;
        if gs == gd {
            // Same granules: word by word.
            for (i, x) in src.words.nonzero() {
                words.or_word(i, x);
            }
        } else {
            for (i, mut x) in src.words.nonzero() {
                while x != 0 {
                    let k = i as u64 * 64 + x.trailing_zeros() as u64;
                    x &= x - 1;
                    let (start, end) = (k << gs, ((k + 1) << gs) - 1);
                    words.set(start >> gd, end >> gd);
                }
            }
        }
        s.changed = true;
        Ok(())
    }
}

/// A bitmap of another image (opened read-only), for a merge.
pub fn source_from(q: &Qcow2, name: &str) -> Result<Source> {
    if let Some(t) = q.bitmap_tracker() {
        return t.source(q, name);
    }
    let st = q.storage();
    let h = q.header();
    let dir = read_directory(st, &h)?.map(|d| d.1).unwrap_or_default();
    let d = dir
        .iter()
        .find(|d| d.name == name.as_bytes())
        .ok_or_else(|| not_found(name))?;
    if d.in_use() {
        return Err(inconsistent(name));
    }
    let (words, _) = load_checked(st, d, h.cluster_size(), h.size)?;
    Ok(Source {
        granularity_bits: d.granularity_bits,
        words,
        disk_size: h.size,
        enabled: d.auto(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// dirty_run, which skips clear pages by the summary, agrees with a
    /// granule-by-granule walk, on bitmaps spanning several pages.
    #[test]
    fn dirty_run_matches_a_plain_walk() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut r = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for round in 0..100 {
            let g = 9 + (r() % 8) as u8;
            let bits = 1 + r() % (512 * 64 * 4);
            let words = Words::zeroed(bits);
            for _ in 0..(r() % 5) {
                // Often near a page's start, where a skip ends.
                let first = match r() % 2 {
                    0 => r() % bits,
                    _ => ((r() % bits) & !(512 * 64 - 1)) | (r() % 130),
                };
                words.set(first, first + r() % 3000);
            }
            let disk_size = (bits << g) - r() % (1 << g);
            let src = Source {
                granularity_bits: g,
                words,
                disk_size,
                enabled: false,
            };
            let is_set = |k: u64| src.words.word((k / 64) as usize) >> (k % 64) & 1 == 1;
            for _ in 0..50 {
                let off = r() % disk_size;
                let len = 1 + r() % (disk_size - off);
                let (dirty, n) = src.dirty_run(off, len);
                let first = off >> g;
                assert_eq!(dirty, is_set(first), "round {round}");
                let end = off + len;
                let mut k = first + 1;
                while k << g < end && is_set(k) == dirty {
                    k += 1;
                }
                assert_eq!(n, (k << g).min(end) - off, "round {round} off {off}");
            }
        }
    }
}
