//! The engine's synchronization primitives, and how a request that must
//! wait for another request's cluster allocation is woken.
//!
//! With the `shuttle` feature the mutexes and condition variables are
//! shuttle's, so that a test can explore the interleavings of threads
//! that share one image (`qcow2/tests/alloc_model.rs`); normal builds use
//! `std::sync`.
//!
//! # Wake-up protocol (no lost requests)
//! An event-loop caller (a block daemon queue) must not block on another
//! queue's allocation, so [`Image::try_begin_write`] refuses instead of
//! waiting and registers the caller's [`AllocWaker`] on the guest cluster
//! that is being allocated. The invariants:
//! 1. Registration happens under the metadata lock, in the same critical
//!    section that found the cluster in flight.
//! 2. Releasing an allocation removes its clusters from the in-flight set
//!    and takes every waker registered on them in one critical section,
//!    then wakes them after the lock is dropped.
//! 3. Every allocation is released: `end_write` ends it whatever the
//!    outcome of the data write, and `abandon_write` when the outcome
//!    will never be known (it leaks the new clusters instead, or fences
//!    the guest clusters off where the late write can land only there:
//!    changes to them then fail instead of waiting). Callers
//!    outside the engine hold the mapped write in a [`PendingWrite`]:
//!    `commit`, `abandon`, or its `Drop` (which rolls back) is the one
//!    way to let go of it, so none is left in flight. (The engine's own
//!    write paths end their `WriteIo` in the same function.)
//!
//! 4. The same holds for in-place writes, which write-zeroes that keeps
//!    the host cluster allocated waits for: an in-place write counts
//!    itself on its clusters under the lock when it is mapped, and
//!    `end_write` uncounts it and takes the wakers registered on those
//!    clusters in one critical section. An in-place write never waits,
//!    so its end never depends on the zeroing.
//!
//! So a refused request's waker is called after the allocation it found
//! ends; the caller retries then, and either succeeds or is refused by a
//! newer allocation, on which it is registered again. A request can be
//! refused only while some other request makes progress, so none
//! starves as long as every allocation ends. A waker must not block and
//! may be called spuriously (after the caller retried for another reason).
//!
//! [`Image::try_begin_write`]: crate::Image::try_begin_write
//! [`PendingWrite`]: crate::PendingWrite

#[cfg(feature = "shuttle")]
pub(crate) use shuttle::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(feature = "shuttle"))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

use std::sync::Arc;

use crate::units::GuestCluster;

/// Wakes a caller whose write was refused because another request was
/// allocating the same cluster (see the module docs). For an event loop,
/// typically a write to an eventfd it polls.
pub trait AllocWaker: Send + Sync {
    fn wake(&self);
}

thread_local! {
    static NONBLOCKING: std::cell::RefCell<Option<Arc<dyn AllocWaker>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread in non-blocking mode: where the engine
/// would wait for another request's allocation (discard, write-zeroes,
/// and the other synchronous writes), it registers `waker` on the cluster
/// and fails with [`Error::WouldBlock`](crate::Error::WouldBlock)
/// instead. For event loops, whose blocker may be a request in another
/// loop that is not running any more (a daemon shutting down). The
/// operations it covers are idempotent, so the caller retries the whole
/// operation when woken.
pub fn without_blocking<R>(waker: &Arc<dyn AllocWaker>, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<Arc<dyn AllocWaker>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            NONBLOCKING.with(|n| *n.borrow_mut() = self.0.take());
        }
    }
    let _reset = Reset(NONBLOCKING.with(|n| n.borrow_mut().replace(waker.clone())));
    f()
}

/// The waker of a thread in non-blocking mode.
pub(crate) fn nonblocking_waker() -> Option<Arc<dyn AllocWaker>> {
    NONBLOCKING.with(|n| n.borrow().clone())
}

/// Wakers registered on guest clusters that are being allocated.
#[derive(Default)]
pub(crate) struct Waiters(Vec<(GuestCluster, Arc<dyn AllocWaker>)>);

impl Waiters {
    /// Registers `w` on guest cluster `gc`, once (a caller refused again
    /// on the same cluster is not registered twice, so the list stays
    /// bounded by callers times clusters in flight).
    pub(crate) fn register(&mut self, gc: GuestCluster, w: &Arc<dyn AllocWaker>) {
        if !self.0.iter().any(|(c, o)| *c == gc && Arc::ptr_eq(o, w)) {
            self.0.push((gc, w.clone()));
        }
    }

    /// Removes and returns the wakers registered on clusters [gc, gc + n).
    pub(crate) fn take(&mut self, gc: GuestCluster, n: u64) -> Vec<Arc<dyn AllocWaker>> {
        if self.0.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        self.0.retain(|(c, w)| {
            let hit = c.within(gc, n);
            if hit {
                out.push(w.clone());
            }
            !hit
        });
        out
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The clusters someone waits on, for state dumps.
    pub(crate) fn clusters(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.0.iter().map(|(c, _)| c.0).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}
