//! L1 and L2 table access through the L2 cache (qcow2.rst, "Cluster
//! mapping"): loading, writing back, decoding entries.

use super::*;

impl Qcow2 {
    pub(super) fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extl2 { 4 } else { 3 }
    }

    // ----- metadata access (lock held) -----

    /// Writes back a dirty L2 table before its slot is reused: refcounts
    /// first (see module docs). A table holding intent log entries (not
    /// marked dirty) is written after a checkpoint.
    pub(super) fn writeback_l2(&self, m: &mut Meta, i: usize) -> Result<()> {
        if m.ilog.holds(m.l2.key(i)) {
            self.log_checkpoint_written(m)?;
        }
        if m.l2.is_dirty(i) {
            self.sync_before_l2(m)?;
            Self::write_l2(&self.st, m, i)?;
        }
        Ok(())
    }

    /// Before an L2 table is written: refcounts written and synced, and
    /// the data of every committed allocation durable (see `end_write`).
    /// A refcount sync covers that data when it is in this file: the data
    /// was written before its commit, and the commit came before this.
    /// Otherwise (no refcount changed since, as when another thread's
    /// flush synced them between an allocation and its data write; or
    /// the data lives in a data file) the data is synced here.
    pub(super) fn sync_before_l2(&self, m: &mut Meta) -> Result<()> {
        let synced = m.rc.is_dirty();
        m.rc.flush(&self.st)?;
        if synced && self.data.is_none() {
            m.data_unsynced = false;
        }
        if m.data_unsynced {
            self.data_storage().sync()?;
            m.data_unsynced = false;
        }
        Ok(())
    }

    /// Writes the changed part of the L2 table in cache slot `i`
    /// (overlap checked).
    pub(super) fn write_l2(st: &Storage, m: &mut Meta, i: usize) -> Result<()> {
        let Some(r) = m.l2.dirty_range(i) else {
            return Ok(());
        };
        let at = m.l2.key(i) + r.start as u64;
        m.rc.overlap
            .write(st, &m.l2.data(i)[r], at, Allow::only(Kind::ActiveL2))?;
        m.l2.mark_clean(i);
        m.l2_unsynced = true;
        Ok(())
    }

    /// Cache slot of the L2 table at host offset `off`.
    pub(super) fn l2_slot(&self, m: &mut Meta, off: u64) -> Result<usize> {
        if let Some(i) = m.l2.lookup(off) {
            return Ok(i);
        }
        if off & (self.cluster_size() - 1) != 0 {
            return Err(Error::Corrupt(format!(
                "L2 table offset {off:#x} is not cluster aligned"
            )));
        }
        if off == 0 {
            return Err(Error::Corrupt("L2 table at offset 0 (the header)".into()));
        }
        let i = m.l2.victim();
        self.writeback_l2(m, i)?;
        self.st.read_at(m.l2.buffer(i), off)?;
        m.ilog.overlay(off, m.l2.buffer(i), m.l2_stride);
        m.l2.assign(i, off, false);
        Ok(i)
    }

    pub(super) fn l2_get(m: &Meta, slot: usize, idx: usize) -> u64 {
        let d = m.l2.data(slot);
        let at = idx * m.l2_stride;
        u64::from_be_bytes(d[at..at + 8].try_into().unwrap())
    }

    pub(super) fn l2_set(m: &mut Meta, slot: usize, idx: usize, v: u64) {
        let at = idx * m.l2_stride;
        m.l2.data_mut_part(slot, at..at + 8)[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    /// Sets an active L1 entry (in memory; written at the next flush) and
    /// keeps the overlap map's active L2 tables in step.
    pub(super) fn set_l1(m: &mut Meta, idx: usize, v: u64) {
        let (old, new) = (L1Entry(m.l1[idx]).l2_offset(), L1Entry(v).l2_offset());
        if old != new {
            let cs = m.rc.overlap.cluster_size();
            if old != 0 {
                m.rc.overlap.remove(Kind::ActiveL2, old, cs);
            }
            if new != 0 {
                m.rc.overlap.add(Kind::ActiveL2, new, cs);
            }
        }
        m.l1[idx] = v;
        m.l1_dirty = Some(match m.l1_dirty {
            None => (idx, idx),
            Some((a, b)) => (a.min(idx), b.max(idx)),
        });
    }

    pub(super) fn decode(&self, raw: u64) -> Result<L2Entry> {
        // Bit 0 is no zero flag with extended L2 entries (but for
        // compressed ones): the bitmap says which subclusters read as
        // zeros.
        let raw = if self.extl2 {
            crate::l2::strip_ext_zero(raw)
        } else {
            raw
        };
        let e = L2Entry::decode_in(raw, self.geom, self.data.is_some());
        match e {
            L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            } if host & (self.cluster_size() - 1) != 0 => Err(Error::Corrupt(format!(
                "cluster offset {host:#x} is not cluster aligned"
            ))),
            L2Entry::Zero { .. } if self.version < 3 => Err(Error::Corrupt(
                "zero cluster flag in a version 2 image".into(),
            )),
            _ => Ok(e),
        }
    }

    /// Slot of the L2 table for L1 index `l1i`, if one is allocated.
    pub(super) fn l2_for(&self, m: &mut Meta, l1i: usize) -> Result<Option<usize>> {
        let Some(&e) = m.l1.get(l1i) else {
            return Ok(None);
        };
        let off = L1Entry(e).l2_offset();
        if off == 0 {
            return Ok(None);
        }
        self.l2_slot(m, off).map(Some)
    }

    /// Makes the L2 table for `l1i` exclusively ours (allocating it, or
    /// copying a table shared with a snapshot) and returns its slot.
    pub(super) fn l2_writable(&self, m: &mut Meta, l1i: usize) -> Result<usize> {
        let e = L1Entry(m.l1[l1i]);
        let old = e.l2_offset();
        if old != 0 && e.copied() {
            return self.l2_slot(m, old);
        }
        let cs = self.cluster_size();
        if old != 0 && m.rc.get(&self.st, old >> self.cluster_bits)? == 1 {
            // Only the active L1 references it after all: just mark it.
            Self::set_l1(m, l1i, L1Entry::new(old, true).0);
            return self.l2_slot(m, old);
        }
        let content = if old != 0 {
            let s = self.l2_slot(m, old)?;
            Some(m.l2.data(s).to_vec())
        } else {
            None
        };
        let new = m.rc.alloc(&self.st, 1)?;
        let i = m.l2.victim();
        self.writeback_l2(m, i)?;
        match &content {
            Some(c) => m.l2.buffer(i).copy_from_slice(c),
            None => m.l2.buffer(i).fill(0),
        }
        m.l2.assign(i, new, true);
        Self::set_l1(m, l1i, L1Entry::new(new, true).0);
        if old != 0 {
            self.queue_free(m, HostOffset(old), cs);
        }
        Ok(i)
    }
}
