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
    ///
    /// Only if every cluster of it has a refcount: on a corrupt image a
    /// reference may have none (refcount 0), and the deferred decrement
    /// would then hit whatever the allocator put there meanwhile (a new
    /// bitmap directory, say). Such a range is left alone, as QEMU's
    /// immediate decrement refuses it (EINVAL: the refcount would go
    /// below zero). Two references counted once pass here; the second
    /// decrement is refused at the flush (see there).
    pub(super) fn queue_free(&self, m: &mut Meta, host: HostOffset, len: u64) {
        let cs = self.cluster_size();
        let (first, end) = (host.0 / cs, (host.0 + len.max(1)).div_ceil(cs));
        if !(first..end).all(|c| m.rc.get(&self.st, c).is_ok_and(|r| r > 0)) {
            let e = Error::io("free", std::io::Error::from_raw_os_error(libc::EINVAL));
            self.st.report_swallowed("qcow2_free_clusters failed", &e);
            return;
        }
        let mut e = self.epochs();
        m.pending_free.push(QueuedFree {
            host,
            len,
            epoch: e.current,
        });
        e.current += 1;
    }

    /// Writes every metadata change to the file in the order described
    /// in the module docs, syncing only where that order needs it: after
    /// refcount changes, and between L2 tables and the L1 entries that may
    /// point at them.
    pub(super) fn write_back(&self, m: &mut Meta) -> Result<()> {
        let mut dirty = m.l2.dirty_slots();
        if dirty.iter().any(|&i| m.ilog.holds(m.l2.key(i))) {
            // A table with intent log entries: they go with it.
            self.log_checkpoint(m)?;
            dirty = m.l2.dirty_slots();
        }
        if dirty.is_empty() {
            m.rc.flush(&self.st)?;
        } else {
            self.sync_before_l2(m)?;
        }
        for i in dirty {
            Self::write_l2(&self.st, m, i)?;
        }
        if let Some((a, b)) = m.l1_dirty {
            if m.l2_unsynced {
                self.st.sync()?;
                m.l2_unsynced = false;
            }
            let mut raw = Vec::with_capacity((b - a + 1) * 8);
            for e in &m.l1[a..=b] {
                raw.extend_from_slice(&e.to_be_bytes());
            }
            let at = m.header.l1_table_offset + a as u64 * 8;
            m.rc.overlap
                .write(&self.st, &raw, at, Allow::only(Kind::ActiveL1))?;
            m.l1_dirty = None;
        }
        // Last: the tables and L1 entries hold every record below it.
        self.log_write_head(m)
    }

    /// Flushes metadata in the order described in the module docs and
    /// releases queued frees.
    pub(super) fn flush_locked(&self, m: &mut Meta) -> Result<()> {
        if !self.st.writable() {
            return Ok(());
        }
        m.rc.overlap.usable()?;
        self.log_checkpoint(m)?;
        self.write_back(m)?;
        self.st.sync()?;
        m.l2_unsynced = false;
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
                // Below zero (a corrupt image counted two references as
                // one, both now dropped): reported and left, as QEMU's
                // free refuses it. The cluster was not allocatable while
                // queued (its refcount was not 0), so nothing else is hit.
                match m.rc.unref(&self.st, f.host, f.len, |c| freed.push(c)) {
                    Err(e @ Error::Corrupt(_)) => {
                        self.st.report_swallowed("qcow2_free_clusters failed", &e)
                    }
                    r => r?,
                }
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
