//! Busy polling (`--poll-us`): after its last request a worker keeps
//! looking at its queue and ring for a while before it sleeps, so that
//! requests arriving meanwhile need no wake-up of its thread (at queue
//! depth 1 on an otherwise idle machine, most of the latency). It polls
//! only while fewer workers are awake than there are cores: a poller on
//! a core another worker needs takes CPU from that worker's requests and
//! from the driver's threads (measured on 2 cores, QD1 buffered writes
//! over 2 queues on ext4: p99 160-660 us with both workers polling,
//! 135-140 with this rule, 130 without polling, qemu-storage-daemon's
//! 310-340; one queue keeps polling's gain, write p50 58-60 us against
//! 94 without). On a single core no worker polls.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Vring, Worker};

/// A device's polling policy, shared by its queues' workers.
#[derive(Debug)]
pub struct Polling {
    /// How long a worker keeps looking after its last request (zero:
    /// never).
    time: Duration,
    /// Workers handling an event now, polling included (also one that
    /// sleeps in a flush or a blocking write meanwhile: a heuristic).
    awake: AtomicUsize,
    cores: usize,
}

/// A worker counted awake, from the start of its event to the end.
pub struct Awake(Arc<Polling>);

impl Drop for Awake {
    fn drop(&mut self) {
        self.0.awake.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Polling {
    /// Polling for `time`, on this machine's cores.
    pub fn new(time: Duration) -> Arc<Polling> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if !time.is_zero() && cores < 2 {
            log::warn!("--poll-us: one core, which the driver needs: no worker polls");
        }
        Polling::on_cores(time, cores)
    }

    fn on_cores(time: Duration, cores: usize) -> Arc<Polling> {
        Arc::new(Polling {
            time,
            awake: AtomicUsize::new(0),
            cores,
        })
    }

    /// Counts the caller awake until the guard drops; nothing is
    /// counted (or polled) with polling off.
    #[must_use]
    pub fn wake(self: &Arc<Self>) -> Option<Awake> {
        if self.time.is_zero() {
            return None;
        }
        self.awake.fetch_add(1, Ordering::Relaxed);
        Some(Awake(self.clone()))
    }

    /// Whether an awake worker may poll: it leaves a core free. (A
    /// heuristic read without ordering: a worker that misses another's
    /// wake-up polls one look longer.)
    fn may_poll(&self) -> bool {
        self.awake.load(Ordering::Relaxed) < self.cores
    }
}

impl Worker {
    /// Keeps looking at the queue and the ring, taking what comes, until
    /// nothing came for the polling time or another worker needs the
    /// core; then the worker goes back to epoll (a kick or completion
    /// that arrives meanwhile is found there). A busy queue returns to
    /// epoll every `POLL_SLICE` all the same: the thread's other events
    /// (stop, exit) and the connection thread (which takes this worker's
    /// lock) get their turn. Between looks it yields the CPU: where
    /// threads outnumber cores (the guest's or client's own), a spinning
    /// worker would keep the very thread that is about to submit the next
    /// request off the CPU (measured: QD1 reads over 2 queues on 2 cores,
    /// p99 120-180 us spinning, 35-42 yielding).
    pub(super) fn poll(&mut self, vring: &Vring) {
        const POLL_SLICE: Duration = Duration::from_millis(1);
        let time = self.cfg.poll.time;
        if time.is_zero() || self.stalled {
            return;
        }
        let start = Instant::now();
        let mut deadline = start + time;
        while self.cfg.poll.may_poll() {
            let mut busy = false;
            if self.ring.has_completions() {
                self.completions();
                busy = true;
            }
            if !self.free.is_empty() && self.avail_pending(vring) {
                self.take_requests(vring);
                busy = true;
            }
            let now = Instant::now();
            if busy {
                deadline = now + time;
            }
            if now >= deadline || now - start >= POLL_SLICE {
                return;
            }
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_only_with_a_core_to_spare() {
        let p = Polling::on_cores(Duration::from_micros(50), 2);
        let a = p.wake().unwrap();
        assert!(p.may_poll(), "alone on two cores");
        let b = p.wake().unwrap();
        assert!(!p.may_poll(), "two awake on two cores");
        drop(a);
        assert!(p.may_poll(), "the other went back to sleep");
        drop(b);
        assert_eq!(p.awake.load(Ordering::Relaxed), 0);
        let one = Polling::on_cores(Duration::from_micros(50), 1);
        let _c = one.wake().unwrap();
        assert!(!one.may_poll(), "a single core is the driver's");
        assert!(Polling::new(Duration::ZERO).wake().is_none());
    }
}
