//! I/O epochs, deferred frees, and flush: the rules that keep a freed
//! cluster from being reused while an old pointer may exist.

use super::*;

impl Qcow2 {
    /// Starts data I/O that maps guest ranges and then reads or writes the
    /// host clusters outside the metadata lock (the engine's own reads and
    /// writes, and callers of the split data path through
    /// [`Image::io_epoch`]). Until the guard is dropped, no cluster freed
    /// after this call is reused, so the I/O cannot touch another guest
    /// range's data even when the guest discards the range concurrently.
    pub(crate) fn epoch(&self) -> IoEpoch {
        IoEpoch::begin(&self.epochs)
    }

    pub(super) fn epochs(&self) -> MutexGuard<'_, crate::datapath::Epochs> {
        crate::datapath::lock_epochs(&self.epochs)
    }

    /// Queues a host range whose last reference was just dropped in
    /// memory, tagged with the current epoch (then advanced).
    pub(super) fn queue_free(&self, m: &mut Meta, host: HostOffset, len: u64) {
        let mut e = self.epochs();
        m.pending_free.push(QueuedFree {
            host,
            len,
            epoch: e.current,
        });
        e.current += 1;
    }

    /// Flushes metadata in the order described in the module docs and
    /// releases queued frees.
    pub(super) fn flush_locked(&self, m: &mut Meta) -> Result<()> {
        if !self.st.writable() {
            return Ok(());
        }
        m.rc.overlap.usable()?;
        m.rc.flush(&self.st)?;
        let dirty = m.l2.dirty_slots();
        for &i in &dirty {
            Self::write_l2(&self.st, m, i)?;
        }
        if let Some((a, b)) = m.l1_dirty.take() {
            if !dirty.is_empty() {
                self.st.sync()?;
            }
            let mut raw = Vec::with_capacity((b - a + 1) * 8);
            for e in &m.l1[a..=b] {
                raw.extend_from_slice(&e.to_be_bytes());
            }
            let at = m.header.l1_table_offset + a as u64 * 8;
            if let Err(e) =
                m.rc.overlap
                    .write(&self.st, &raw, at, Allow::only(Kind::ActiveL1))
            {
                m.l1_dirty = Some((a, b));
                return Err(e);
            }
        }
        self.st.sync()?;
        if let Some(d) = &self.data {
            d.st.sync()?;
        }
        if !m.pending_free.is_empty() {
            // Only frees queued after every running I/O began: older I/O
            // may still read or write the cluster it mapped before.
            let oldest = self.epochs().active.keys().next().copied();
            let (frees, later): (Vec<_>, Vec<_>) = std::mem::take(&mut m.pending_free)
                .into_iter()
                .partition(|f| oldest.is_none_or(|o| f.epoch < o));
            m.pending_free = later;
            let mut freed = Vec::new();
            for f in &frees {
                // A freed L2 table must not be found in the cache again.
                m.l2.remove(f.host.0);
                m.rc.unref(&self.st, f.host, f.len, |c| freed.push(c))?;
            }
            if self.opts.discard_passthrough {
                freed.sort_unstable();
                let cs = self.cluster_size();
                let mut k = 0;
                while k < freed.len() {
                    let mut j = k + 1;
                    while j < freed.len() && freed[j] == freed[j - 1] + 1 {
                        j += 1;
                    }
                    // A freed cluster must be no metadata any more.
                    m.rc.overlap
                        .punch_hole(&self.st, freed[k] * cs, (j - k) as u64 * cs)?;
                    k = j;
                }
            }
            m.rc.flush(&self.st)?;
        }
        Ok(())
    }
}
