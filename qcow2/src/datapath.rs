//! The guards of the split data path: callers that move guest data
//! themselves (a daemon's io_uring) map a range through the [`Image`],
//! do the I/O outside the engine's lock, and end what the mapping began
//! through these guards, whose `Drop` ends it when the caller does not.
//!
//! - [`IoEpoch`]: held while data I/O mapped through the image runs; no
//!   cluster freed after it began is reused until it is dropped.
//! - [`PendingWrite`]: a write mapped to one host extent; `commit` once
//!   its data is written, and a guard dropped uncommitted rolls the
//!   allocation back, so its clusters never stay in flight.
//!
//! Raw images map guest offsets to the same file offsets: their guards
//! hold nothing but the range, for [`PendingWrite::abandon`].
//!
//! A write given up on while its I/O may still run ([`PendingWrite::abandon`])
//! fences off the guest range it may land in ([`Fence`]): where the data
//! has no other place to go than that range, every later change there is
//! refused rather than be overtaken by the late write.
//!
//! [`Image`]: crate::Image

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::l2::L2Entry;
use crate::sync::{Mutex, MutexGuard};
use crate::units::HostOffset;

/// What a run of guest bytes maps to in this layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Stored at this host file offset (in the file `data_storage`
    /// returns).
    Data(HostOffset),
    /// Reads as zeros (with the preallocated host offset, if any).
    Zero(Option<HostOffset>),
    /// Not stored here: the backing image, or zeros.
    Unallocated,
    /// Inside a compressed cluster.
    Compressed(L2Entry),
}

/// Data I/O epochs: which epochs have I/O running outside the lock.
#[derive(Debug, Default)]
pub(crate) struct Epochs {
    pub(crate) current: u64,
    /// Epoch -> number of guards taken in it and not yet dropped.
    pub(crate) active: BTreeMap<u64, u32>,
}

/// Shared by an image and the epoch guards of its running I/O.
pub(crate) type SharedEpochs = Arc<Mutex<Epochs>>;

/// Locks the epochs. They stay consistent whatever a panicking holder
/// did (each change is one step), so poisoning is ignored.
pub(crate) fn lock_epochs(e: &SharedEpochs) -> MutexGuard<'_, Epochs> {
    e.lock().unwrap_or_else(|p| p.into_inner())
}

/// Held by data I/O that maps guest ranges and accesses host clusters
/// outside the engine's lock (see [`Image::io_epoch`]). Dropping it ends
/// the I/O: frees queued after it began may then be applied.
///
/// [`Image::io_epoch`]: crate::Image::io_epoch
#[must_use = "the epoch ends when the guard is dropped: hold it across the I/O"]
#[derive(Debug)]
pub struct IoEpoch(Option<(SharedEpochs, u64)>);

impl IoEpoch {
    /// The guard of an image that never reuses what it frees (raw).
    pub fn none() -> IoEpoch {
        IoEpoch(None)
    }

    /// Begins I/O in the current epoch of `epochs`.
    pub(crate) fn begin(epochs: &SharedEpochs) -> IoEpoch {
        let mut e = lock_epochs(epochs);
        let epoch = e.current;
        *e.active.entry(epoch).or_default() += 1;
        drop(e);
        IoEpoch(Some((epochs.clone(), epoch)))
    }
}

impl Drop for IoEpoch {
    fn drop(&mut self) {
        let Some((epochs, epoch)) = self.0.take() else {
            return;
        };
        let mut e = lock_epochs(&epochs);
        if let Some(n) = e.active.get_mut(&epoch) {
            *n -= 1;
            if *n == 0 {
                e.active.remove(&epoch);
            }
        }
    }
}

/// How a format ends a mapped write (see [`PendingWrite`]).
pub(crate) trait WriteEnd: Send {
    /// The data is written: make the new mapping visible.
    fn commit(self: Box<Self>) -> Result<()>;
    /// The data write failed or never happened: give back what the
    /// mapping took; the old mapping stays.
    fn rollback(self: Box<Self>);
    /// The data write may still land and will never be waited for: let
    /// others go on without ever reusing where it may land.
    fn abandon(self: Box<Self>);
}

/// A guest write mapped to one host extent: the caller writes
/// [`len`](Self::len) bytes of its data at [`host`](Self::host) in the
/// file [`Image::data_storage`] returns, then calls
/// [`commit`](Self::commit). Dropped uncommitted, it rolls back: the
/// guest range keeps its old content and the allocation ends, so other
/// requests waiting for the clusters go on.
///
/// Until it ends, write-zeroes without unmap over its clusters waits for
/// it: a thread must not run one while it holds the guard.
///
/// [`Image::data_storage`]: crate::Image::data_storage
#[must_use = "a pending write is rolled back when dropped: commit it once its data is written"]
pub struct PendingWrite {
    host: HostOffset,
    len: usize,
    end: Option<Box<dyn WriteEnd>>,
}

impl std::fmt::Debug for PendingWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingWrite")
            .field("host", &self.host)
            .field("len", &self.len)
            .finish()
    }
}

impl PendingWrite {
    pub(crate) fn new(host: HostOffset, len: usize, end: Box<dyn WriteEnd>) -> PendingWrite {
        PendingWrite {
            host,
            len,
            end: Some(end),
        }
    }

    /// Host file offset where the data goes.
    pub fn host(&self) -> HostOffset {
        self.host
    }

    /// Bytes of the request this extent covers (at least one).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a mapped extent covers at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ends the write once its data is written: the new mapping becomes
    /// visible. On error nothing points at the new clusters (the old
    /// mapping stays) and the allocation has ended.
    pub fn commit(mut self) -> Result<()> {
        match self.end.take() {
            Some(e) => e.commit(),
            None => Ok(()),
        }
    }

    /// Ends a write whose data I/O may still be running and will never
    /// be waited for (an io_uring that cannot be waited on). The guest
    /// range keeps its old mapping and the host clusters the write may
    /// land in are leaked, never referenced nor reused: a late write
    /// damages nothing, and whoever waits for the clusters goes on.
    ///
    /// Where the write has no other place to land than the guest's own
    /// range (raw images, external data files, writes in place) that
    /// range is fenced off instead ([`Fence`]): until the image is opened
    /// again every write, zeroing or discard touching it fails with
    /// [`Error::Fenced`], so the late write never overtakes a newer one.
    /// Reads there return the old data or the late write's.
    ///
    /// The caller must also leak (`std::mem::forget`) the [`IoEpoch`] the
    /// write was mapped under: host clusters freed later are then never
    /// reused, wherever the late write goes.
    pub fn abandon(mut self) {
        if let Some(e) = self.end.take() {
            e.abandon();
        }
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if let Some(e) = self.end.take() {
            e.rollback();
        }
    }
}

/// Guest byte ranges where an abandoned write may still land (see
/// [`PendingWrite::abandon`]). Empty in a healthy process: checking it is
/// one atomic load until something is fenced.
#[derive(Debug, Default)]
pub(crate) struct Fence {
    any: AtomicBool,
    ranges: Mutex<Vec<Range<u64>>>,
}

impl Fence {
    /// Fences off [off, off + len) for good.
    pub(crate) fn add(&self, off: u64, len: u64) {
        let mut r = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        r.push(off..off.saturating_add(len));
        self.any.store(true, Ordering::Release);
    }

    /// Fails with [`Error::Fenced`] when [off, off + len) touches a
    /// fenced range. Callers that order changes under a lock check under
    /// it, so that a change and a fence are never concurrent.
    pub(crate) fn check(&self, off: u64, len: u64) -> Result<()> {
        if !self.any.load(Ordering::Acquire) {
            return Ok(());
        }
        let end = off.saturating_add(len.max(1));
        let r = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        match r.iter().find(|f| f.start < end && off < f.end) {
            Some(f) => Err(Error::Fenced {
                offset: f.start,
                len: f.end - f.start,
            }),
            None => Ok(()),
        }
    }
}

/// A mapped write covers at least one byte: refuses empty ones (their
/// last byte would be before their first).
pub(crate) fn check_write_len(len: usize) -> Result<()> {
    if len == 0 {
        return Err(Error::InvalidArgument("empty write".into()));
    }
    Ok(())
}
