//! The in-flight allocation set and the in-place write counts: waiting
//! for them, and waking whoever waits when an allocation or in-place
//! write ends (the protocol is in [`crate::sync`]).

use super::*;

impl Qcow2 {
    /// Ends the allocation of guest clusters [gc, gc + n): they leave the
    /// in-flight set, and whoever waits for them (blocked in
    /// `wait_inflight`, or refused by `try_begin_write`) is woken. The one
    /// place an allocation ends (see [`crate::sync`]).
    pub(super) fn release_inflight(&self, mut m: MutexGuard<'_, Meta>, gc: GuestCluster, n: u64) {
        for c in gc.span(n) {
            m.inflight.remove(&c);
        }
        let wake = m.waiters.take(gc, n);
        drop(m);
        self.alloc_done.notify_all();
        for w in wake {
            w.wake();
        }
    }

    /// An in-place write into guest clusters [first, first + n) ended:
    /// zeroing that waits for it (`wait_busy`) is woken.
    pub(super) fn end_inplace(&self, first: GuestCluster, n: u64) {
        let mut m = self.lock();
        for c in first.span(n) {
            if let std::collections::hash_map::Entry::Occupied(mut e) = m.inplace.entry(c) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
        let wake = m.waiters.take(first, n);
        // Most in-place writes end with nobody waiting: no wake-up call.
        let sleepers = m.sleepers > 0;
        drop(m);
        if sleepers {
            self.alloc_done.notify_all();
        }
        for w in wake {
            w.wake();
        }
    }

    /// Waits until none of the guest clusters [gc, gc + n) is being
    /// allocated; in non-blocking mode ([`crate::sync::without_blocking`])
    /// registers the thread's waker on a busy one and fails instead.
    pub(super) fn wait_inflight<'a>(
        &'a self,
        m: MutexGuard<'a, Meta>,
        gc: GuestCluster,
        n: u64,
    ) -> Result<MutexGuard<'a, Meta>> {
        self.wait_busy(m, gc, n, false)
    }

    /// As [`wait_inflight`](Self::wait_inflight), and with `inplace` also
    /// until no in-place write into those clusters is in progress. Fails
    /// at once where an abandoned write fenced the clusters off (checked
    /// under the lock, as the fence is added).
    pub(super) fn wait_busy<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        gc: GuestCluster,
        n: u64,
        inplace: bool,
    ) -> Result<MutexGuard<'a, Meta>> {
        let cb = self.cluster_bits;
        loop {
            // Again after each wait: what it waited for may have been
            // abandoned, fencing the clusters.
            self.fence.check(gc.offset(cb).0, n << cb)?;
            if m.inflight.is_empty() && (!inplace || m.inplace.is_empty()) {
                break;
            }
            let Some(busy) = gc
                .span(n)
                .find(|c| m.inflight.contains(c) || (inplace && m.inplace.contains_key(c)))
            else {
                break;
            };
            if let Some(w) = crate::sync::nonblocking_waker() {
                m.waiters.register(busy, &w);
                return Err(Error::WouldBlock);
            }
            m.sleepers += 1;
            m = self
                .alloc_done
                .wait(m)
                .expect("qcow2 metadata lock poisoned");
            m.sleepers -= 1;
        }
        Ok(m)
    }

    /// Waits until some allocation or in-place write ends, or `timeout`
    /// passes (for callers that poll with `try_begin_write` or in
    /// non-blocking mode and may not block for good).
    pub(super) fn wait_any_allocation(&self, timeout: std::time::Duration) {
        let mut m = self.lock();
        if !m.inflight.is_empty() || !m.inplace.is_empty() {
            m.sleepers += 1;
            let (mut m, _) = self
                .alloc_done
                .wait_timeout(m, timeout)
                .expect("qcow2 metadata lock poisoned");
            m.sleepers -= 1;
        }
    }

    /// The allocation state, for a daemon's state dump: guest clusters
    /// being allocated, and those that refused callers wait on. Never
    /// blocks for long: the metadata lock, which a request holds briefly
    /// (possibly at the very moment of the dump), is retried for up to
    /// `DUMP_PATIENCE`; still held then, it is reported as such.
    pub(super) fn describe_allocations(&self) -> String {
        const DUMP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);
        let deadline = std::time::Instant::now() + DUMP_PATIENCE;
        let m = loop {
            match self.meta.try_lock() {
                Ok(m) => break m,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if std::time::Instant::now() >= deadline {
                return "metadata lock held (busy or stuck)".into();
            }
            // A futex wait: allowed where clock_nanosleep (sleep) may not
            // be (a daemon's seccomp filter).
            std::thread::park_timeout(std::time::Duration::from_millis(1));
        };
        let mut inflight: Vec<u64> = m.inflight.iter().map(|c| c.0).collect();
        inflight.sort_unstable();
        let active: u32 = self.epochs().active.values().sum();
        format!(
            "clusters being allocated {:?}; clusters with in-place writes {}; \
             waiters {} on clusters {:?}; threads blocked {}; I/O epochs held {active}; \
             frees pending {}",
            inflight,
            m.inplace.len(),
            m.waiters.len(),
            m.waiters.clusters(),
            m.sleepers,
            m.pending_free.len()
        )
    }
}
