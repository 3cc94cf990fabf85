//! Inflight I/O tracking for split rings (the vhost-user spec's
//! "Inflight I/O tracking", protocol feature INFLIGHT_SHMFD): a shared
//! memory region, created by the daemon (GET_INFLIGHT_FD) and kept by the
//! frontend across daemon restarts (SET_INFLIGHT_FD), in which the daemon
//! marks every head it takes and clears the mark once the head's used
//! entry is published. A new daemon finds there which requests its
//! predecessor took and never returned, and runs them again.
//!
//! Queue `q`'s part of the region starts at `q * stride(queue_size)`, all
//! fields native-endian:
//!
//! ```text
//!  @0  features u64   @8 version u16   @10 desc_num u16
//!  @12 last_batch_head u16             @14 used_idx u16
//!  @16 desc[desc_num], 16 bytes each:
//!      @0 inflight u8   @6 next u16   @8 counter u64
//! ```
//!
//! The protocol ([`QueueLog`]):
//! - take head `h`: `counter[h] = n++`, then `inflight[h] = 1`, before the
//!   request can complete, and before any later completion is published
//!   (otherwise the rewind below would skip `h`'s avail slot, or read a
//!   returned head again);
//! - return a batch: link it (`next`, `last_batch_head`), publish the used
//!   index, clear the marks, store the used index in `used_idx`;
//! - recover: a used index ahead of `used_idx` means a batch was published
//!   but its marks not cleared: walk the batch list and clear them. What
//!   is still marked was taken and never returned: it is run again in
//!   counter order, and the avail ring is read from `used + marked` on.
//!
//! The frontend (a guest's VMM, possibly hostile) can write the region at
//! any time: every value read back is bounded before use, and a region
//! that makes no sense is re-initialised (nothing resubmitted) with a
//! warning rather than trusted.

use log::warn;

mod region;

pub use region::{Description, Inflight, Region, RegionSetError};

/// The region version this daemon writes (0: never initialised).
pub const REGION_VERSION: u16 = 1;
/// Largest queue size a region may describe.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Queue regions start at multiples of this.
const ALIGN: usize = 64;

const VERSION: usize = 8;
const DESC_NUM: usize = 10;
const LAST_BATCH_HEAD: usize = 12;
const USED_IDX: usize = 14;
const DESCS: usize = 16;
const DESC_LEN: usize = 16;
const D_INFLIGHT: usize = 0;
const D_NEXT: usize = 6;
const D_COUNTER: usize = 8;

/// Bytes of one queue's region for a queue of `queue_size` entries (the
/// header and the descriptor states, rounded up to 64 bytes).
pub fn stride(queue_size: u16) -> usize {
    (DESCS + DESC_LEN * usize::from(queue_size)).next_multiple_of(ALIGN)
}

/// Memory holding a region, accessed one naturally aligned field at a
/// time. The daemon's is the shared mapping ([`Region`]); the model tests
/// record every store to replay crashes.
pub trait RegionMem {
    /// Bytes addressable from 0.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn load8(&self, at: usize) -> u8;
    fn load16(&self, at: usize) -> u16;
    fn load64(&self, at: usize) -> u64;
    /// Stores are ordered: none becomes visible before an earlier one
    /// (to the region or to the guest's rings).
    fn store8(&self, at: usize, v: u8);
    fn store16(&self, at: usize, v: u16);
    fn store64(&self, at: usize, v: u64);
}

/// Why a queue's region cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflightError {
    #[error("unknown region version {0}")]
    BadVersion(u16),
    #[error("region for {found} descriptors, {want} expected")]
    DescNum { found: u16, want: u16 },
    #[error("ring of {ring} entries larger than the region's {desc_num}")]
    RingTooLarge { ring: u16, desc_num: u16 },
    #[error(
        "used index {used} is {batch} ahead of the logged {logged}, more than a ring of {ring}"
    )]
    TornBatch {
        used: u16,
        logged: u16,
        batch: u16,
        ring: u16,
    },
    #[error("the last batch's list visits head {0} twice")]
    BatchLoop(u16),
    #[error("head {head} outside a ring of {ring} entries")]
    HeadOutOfRange { head: u16, ring: u16 },
    #[error("mark {value} at head {head}")]
    BadMark { head: u16, value: u8 },
}

/// One queue's part of an inflight region, as its worker writes it.
pub struct QueueLog<M> {
    mem: M,
    base: usize,
    desc_num: u16,
    /// The next take's counter.
    counter: u64,
}

impl<M: RegionMem> QueueLog<M> {
    /// The queue region at `base` of `mem`, for `desc_num` descriptors;
    /// None if it does not fit.
    pub fn new(mem: M, base: usize, desc_num: u16) -> Option<QueueLog<M>> {
        let end = base.checked_add(stride(desc_num))?;
        (desc_num > 0 && end <= mem.len() && base.is_multiple_of(ALIGN)).then_some(QueueLog {
            mem,
            base,
            desc_num,
            counter: 0,
        })
    }

    /// Descriptors the region tracks: heads below this.
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    pub fn memory(&self) -> &M {
        &self.mem
    }

    fn desc(&self, head: u16, field: usize) -> usize {
        self.base + DESCS + DESC_LEN * usize::from(head) + field
    }

    /// Marks `head` taken. Must precede the request's start: it may
    /// complete, and other requests with it, before `start` returns.
    pub fn take(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        self.mem.store64(self.desc(head, D_COUNTER), self.counter);
        self.counter += 1;
        self.mem.store8(self.desc(head, D_INFLIGHT), 1);
    }

    /// Before the used entries of `heads` are published: links them as
    /// the last batch, for a recovery that finds the used index ahead of
    /// `used_idx` to clear their marks.
    pub fn complete_begin(&self, heads: &[u16]) {
        let mut last = self.mem.load16(self.base + LAST_BATCH_HEAD);
        for &h in heads.iter().filter(|&&h| h < self.desc_num) {
            self.mem.store16(self.desc(h, D_NEXT), last);
            last = h;
        }
        self.mem.store16(self.base + LAST_BATCH_HEAD, last);
    }

    /// After the used index `used_idx` that covers `heads` is published:
    /// clears their marks and logs the index.
    pub fn complete_end(&self, heads: &[u16], used_idx: u16) {
        for &h in heads.iter().filter(|&&h| h < self.desc_num) {
            self.mem.store8(self.desc(h, D_INFLIGHT), 0);
        }
        self.mem.store16(self.base + USED_IDX, used_idx);
    }

    /// Starts the queue on this region: `used` is the guest's used index
    /// now, `ring` the ring's size. Returns the heads taken and not
    /// returned by the previous daemon, in the order it took them; the
    /// avail ring is to be read from `used + heads.len()` on. A region
    /// never initialised (version 0) is initialised and returns nothing.
    pub fn recover(&mut self, used: u16, ring: u16) -> Result<Vec<u16>, InflightError> {
        match self.mem.load16(self.base + VERSION) {
            0 => {
                self.reset(used);
                return Ok(Vec::new());
            }
            REGION_VERSION => {}
            v => return Err(InflightError::BadVersion(v)),
        }
        let found = self.mem.load16(self.base + DESC_NUM);
        if found != self.desc_num {
            return Err(InflightError::DescNum {
                found,
                want: self.desc_num,
            });
        }
        if ring > self.desc_num {
            return Err(InflightError::RingTooLarge {
                ring,
                desc_num: self.desc_num,
            });
        }
        let logged = self.mem.load16(self.base + USED_IDX);
        let batch = used.wrapping_sub(logged);
        if batch > ring {
            return Err(InflightError::TornBatch {
                used,
                logged,
                batch,
                ring,
            });
        }
        // A batch published, its marks not all cleared: clear them all.
        let mut seen = vec![false; usize::from(ring)];
        let mut h = self.mem.load16(self.base + LAST_BATCH_HEAD);
        for _ in 0..batch {
            let slot = seen
                .get_mut(usize::from(h))
                .ok_or(InflightError::HeadOutOfRange { head: h, ring })?;
            if std::mem::replace(slot, true) {
                return Err(InflightError::BatchLoop(h));
            }
            self.mem.store8(self.desc(h, D_INFLIGHT), 0);
            h = self.mem.load16(self.desc(h, D_NEXT));
        }
        if batch != 0 {
            self.mem.store16(self.base + USED_IDX, used);
        }
        let mut marked = Vec::new();
        for head in 0..self.desc_num {
            match self.mem.load8(self.desc(head, D_INFLIGHT)) {
                0 => continue,
                1 if head < ring => {}
                1 => return Err(InflightError::HeadOutOfRange { head, ring }),
                value => return Err(InflightError::BadMark { head, value }),
            }
            marked.push((self.mem.load64(self.desc(head, D_COUNTER)), head));
        }
        marked.sort_unstable();
        self.counter = marked.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Ok(marked.into_iter().map(|(_, h)| h).collect())
    }

    /// [`recover`](Self::recover), or for a region that cannot be
    /// trusted: a warning, a fresh region, and nothing to resubmit.
    pub fn restart(&mut self, queue: usize, used: u16, ring: u16) -> Vec<u16> {
        self.recover(used, ring).unwrap_or_else(|e| {
            warn!("queue {queue}: inflight region ignored and reset: {e}");
            self.reset(used);
            Vec::new()
        })
    }

    /// Initialises the queue's region: nothing taken, `used` returned.
    pub fn reset(&mut self, used: u16) {
        for h in 0..self.desc_num {
            self.mem.store8(self.desc(h, D_INFLIGHT), 0);
        }
        self.mem.store16(self.base + DESC_NUM, self.desc_num);
        self.mem.store16(self.base + LAST_BATCH_HEAD, 0);
        self.mem.store16(self.base + USED_IDX, used);
        self.mem.store16(self.base + VERSION, REGION_VERSION);
        self.counter = 0;
    }
}

#[cfg(test)]
mod tests;
