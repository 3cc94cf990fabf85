//! [`MetadataPersistence::ProcessDeath`]: the metadata an operation
//! changed is written to the file before the operation returns, so that
//! a process killed after completing a write loses nothing of it (its
//! data was written with pwrite already; the page cache outlives the
//! process).
//!
//! The write ordering of the module docs must then hold without the
//! flush that usually separates its steps, also for a power loss, where
//! the kernel may write pages back in any order. Syncing per request
//! would cost what this mode must not, so:
//! - the image is marked dirty (v3), synced, when opened for writing:
//!   whatever a kill or a power loss leaks halfway through a change is
//!   repaired by the next writer;
//! - guest data clusters come from a reserve taken ahead in batches
//!   whose refcounts are written and synced once per batch: an L2 entry
//!   then never reaches the disk before the refcount it needs. Reused
//!   clusters are zeroed with that sync, so an entry that reaches the
//!   disk before its data shows zeros, never another cluster's old data
//!   (the guest wrote there and did not flush: QEMU may show zeros there
//!   too, and old data). After a crash, the unused rest of the batch is a
//!   leak (see [`reserve_size`]), repaired at the next writable open; it
//!   is given back when the image is closed or its metadata is walked as
//!   a whole (`quiesce`, `with_meta`);
//! - copy-on-write fill, and the data of a zero cluster reused in place,
//!   is synced before the entry mapping it (`end_write`): only those
//!   writes pay for it; with the intent log, fills from a backing file
//!   are synced at a checkpoint instead (see `ilog`);
//! - rarer changes (a new L2 table or refcount block, a rollback) sync
//!   through `write_back`: refcounts before L2 tables, L2 tables before
//!   the L1 entries pointing at them.
//!
//! `qcow2/tests/power_loss/` checks all of it against crash images.

use std::collections::VecDeque;

use super::*;

/// Guest data clusters reserved at once, for a request that needs `n`:
/// [`RESERVE_BYTES`] worth, but at least 16 and at most 128 clusters
/// (64 KiB clusters: 128 = 8 MiB; 2 MiB clusters: 16 = 32 MiB), or `n`
/// if more. One sync per reserve: with 64 KiB clusters, one per 128
/// allocating writes at most.
pub(super) fn reserve_size(n: u64, cluster_bits: u32) -> u64 {
    n.max((RESERVE_BYTES >> cluster_bits).clamp(16, 128))
}
const RESERVE_BYTES: u64 = 8 << 20;

/// Runs of clusters whose refcount is 1 on disk and that nothing
/// references yet.
#[derive(Default)]
pub(super) struct Reserve {
    runs: VecDeque<Run>,
    /// This process set the header's dirty bit (v3), at the writable open
    /// or when it wrote after a clean finish: a kill leaves the image
    /// marked, and the next open for writing repairs the leaked reserve
    /// as QEMU repairs a lazy-refcounts image (`dirty_open`). Cleared on a
    /// clean close.
    marked_dirty: bool,
    /// A reserve extended the file (given back at a clean finish).
    extended: bool,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    /// First host cluster and count.
    first: u64,
    n: u64,
    /// The clusters lie past everything written when they were taken.
    fresh: bool,
    /// Clusters used before (freed since) were zeroed in the file with
    /// the batch's sync: see `refill_reserve`.
    zeroed: bool,
}

impl Qcow2 {
    /// Writes the metadata changed so far to the file, if this image
    /// persists metadata before operations complete.
    pub(super) fn persist(&self, m: &mut Meta) -> Result<()> {
        if self.opts.metadata_persistence != MetadataPersistence::ProcessDeath {
            return Ok(());
        }
        // Marked at open; again if a clean finish cleared the mark and the
        // image is still written.
        if self.mark_dirty_while_open(m)? {
            self.st.sync()?;
        }
        self.write_back(m)
    }

    /// Up to `n` contiguous new clusters for guest data: their host
    /// offset, how many (at least 1), and whether they are fresh (read as
    /// zeros unwritten).
    pub(super) fn alloc_data_clusters(
        &self,
        m: &mut Meta,
        n: u64,
    ) -> Result<(HostOffset, u64, bool)> {
        let cb = self.cluster_bits;
        if self.opts.metadata_persistence != MetadataPersistence::ProcessDeath {
            let fresh_from = m.rc.end();
            let host = m.rc.alloc_data(&self.st, n)?;
            return Ok((host, n, host.cluster(cb) >= fresh_from));
        }
        if m.reserve.runs.is_empty() {
            self.refill_reserve(m, n)?;
        }
        let run = m.reserve.runs.front_mut().expect("refilled");
        let got = run.n.min(n);
        let host = HostOffset(run.first << cb);
        let fresh = run.fresh || run.zeroed;
        run.first += got;
        run.n -= got;
        if run.n == 0 {
            m.reserve.runs.pop_front();
        }
        Ok((host, got, fresh))
    }

    /// Takes at least `n` clusters (and a reserve's worth) into the
    /// reserve and makes their refcounts durable. Until that succeeded
    /// none is handed out (on failure they leak).
    fn refill_reserve(&self, m: &mut Meta, n: u64) -> Result<()> {
        let cb = self.cluster_bits;
        let want = reserve_size(n, cb);
        // The dirty bit is durable before any refcount of the reserve
        // can be (a power loss that kept those and lost the bit would
        // leave leaks no open repairs); usually set at open already.
        if self.mark_dirty_while_open(m)? {
            self.st.sync()?;
        }
        let fresh_from = m.rc.end();
        let mut runs: Vec<Run> = Vec::new();
        for _ in 0..want {
            let c = m.rc.alloc(&self.st, 1)? >> cb;
            let fresh = c >= fresh_from;
            match runs.last_mut() {
                Some(r) if r.first + r.n == c && r.fresh == fresh => r.n += 1,
                _ => runs.push(Run {
                    first: c,
                    n: 1,
                    fresh,
                    zeroed: false,
                }),
            }
        }
        // Clusters used before still hold someone's old data. An entry
        // mapping one may reach the disk before the new data does (they
        // are not synced in between), and a power loss would then show
        // that old data in another guest cluster. Zeroed with the batch's
        // sync, such a cluster reads as zeros there instead, as a fresh
        // one does (and copy-on-write need not write zeros into it).
        for r in runs.iter_mut().filter(|r| !r.fresh) {
            self.st.write_zeroes(r.first << cb, r.n << cb)?;
            r.zeroed = true;
        }
        // The file covers the reserve: a check (rimg's or QEMU's) counts
        // refcounts only up to the end of the file, so a reserve past it
        // would be a leak no repair sees, until the file grows over it.
        // One zero byte in its last cluster (which reads as zeros anyway)
        // extends the file: a pwrite, which the queue threads may make
        // (their seccomp list has no ftruncate nor stat).
        if let Some(last) = runs.last().filter(|r| r.fresh) {
            self.st.write_at(&[0], ((last.first + last.n) << cb) - 1)?;
            m.reserve.extended = true;
        }
        // Syncs the length with the refcounts.
        m.rc.flush(&self.st)?;
        m.reserve.runs.extend(runs);
        Ok(())
    }

    /// Sets the dirty bit (v3 images; v2 has no incompatible features, a
    /// killed process leaves leaks there for `check -r leaks`); true if
    /// it was not set. The caller syncs it before any refcount of the
    /// reserve is written.
    pub(super) fn mark_dirty_while_open(&self, m: &mut Meta) -> Result<bool> {
        if m.header.version < 3 || m.header.is_dirty() {
            return Ok(false);
        }
        let bits = m.header.incompatible_features | incompat::DIRTY;
        self.write_incompatible(m, bits)?;
        m.reserve.marked_dirty = true;
        Ok(true)
    }

    /// Clears the dirty bit this process set, once the reserve is given
    /// back and the metadata synced (a clean close).
    pub(super) fn mark_clean_after_reserve(&self, m: &mut Meta) -> Result<()> {
        // Frees still queued (I/O that began before them is running) are
        // leaks if the process dies now: the mark stays for the repair.
        // So it does while the intent log is live (a replay needs it).
        if !m.reserve.marked_dirty
            || !m.reserve.runs.is_empty()
            || !m.pending_free.is_empty()
            || m.ilog.is_live()
        {
            return Ok(());
        }
        let bits = m.header.incompatible_features & !incompat::DIRTY;
        self.write_incompatible(m, bits)?;
        self.st.sync()?;
        m.reserve.marked_dirty = false;
        Ok(())
    }

    /// Gives the reserved clusters back. Nothing references them, so their
    /// refcounts may drop at once; a failure leaves them leaked.
    pub(super) fn release_reserve(&self, m: &mut Meta) {
        let cs = self.cluster_size();
        while let Some(r) = m.reserve.runs.pop_back() {
            let host = HostOffset(r.first * cs);
            if let Err(e) = m.rc.unref(&self.st, host, r.n * cs, |_| {}) {
                self.st.report_swallowed("qcow2 reserve release failed", &e);
                continue;
            }
            if r.fresh {
                // Never written: the file need not reach past them.
                m.rc.unnote_end(r.first..r.first + r.n);
            }
        }
    }

    /// After the reserve was given back at the end (finish, drop): the
    /// file back to what the allocated clusters need, never below its
    /// length at open. From the process's thread (ftruncate, stat).
    pub(super) fn trim_after_reserve(&self, m: &mut Meta) -> Result<()> {
        if !m.reserve.extended || !m.reserve.runs.is_empty() {
            return Ok(());
        }
        let end = (m.rc.end() * self.cluster_size()).max(m.len_at_open);
        if self.st.len()? > end {
            self.st.set_len(end)?;
        }
        m.reserve.extended = false;
        Ok(())
    }
}

#[cfg(test)]
mod ilog_tests;
#[cfg(test)]
mod tests;
