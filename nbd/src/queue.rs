//! The queue between a connection's reader and its workers
//! ([`crate::concurrent`]): jobs in order, a byte budget, and the rule
//! for when a worker starts. With the `shuttle` feature its locks are
//! shuttle's, and `nbd/tests/queue_model.rs` explores the interleavings.
//!
//! Liveness: a worker waits only while the queue is empty and open; the
//! reader waits only while jobs hold budget, each of which a worker is
//! answering or will take (there is a worker for every queued job: one
//! is started while queued jobs would outnumber idle workers, and the
//! reader answers inline when none could start). Every change a waiter
//! waits for (a job queued, the queue closed, budget given back) is made
//! under the lock and followed by a notify.

use std::collections::VecDeque;

#[cfg(feature = "shuttle")]
use shuttle::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(feature = "shuttle"))]
use std::sync::{Condvar, Mutex, MutexGuard};

struct State<T> {
    jobs: VecDeque<T>,
    /// Bytes held by queued and running jobs.
    held: u64,
    idle: usize,
    workers: usize,
    closed: bool,
}

pub struct Queue<T> {
    state: Mutex<State<T>>,
    /// Workers wait here for jobs.
    work: Condvar,
    /// The reader waits here for budget.
    room: Condvar,
    budget: u64,
    max_workers: usize,
}

impl<T> Queue<T> {
    /// A queue whose jobs hold at most `budget` bytes at once (one job
    /// always fits), served by at most `max_workers` workers.
    pub fn new(budget: u64, max_workers: usize) -> Queue<T> {
        Queue {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                held: 0,
                idle: 0,
                workers: 0,
                closed: false,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            budget,
            max_workers,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `cost` more bytes fit (always, when nothing is held,
    /// or once the queue is closed), and holds them.
    pub fn reserve(&self, cost: u64) {
        let mut s = self.lock();
        while s.held > 0 && s.held + cost > self.budget && !s.closed {
            s = self.room.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.held += cost;
    }

    /// Gives back what [`reserve`](Self::reserve) held.
    pub fn release(&self, cost: u64) {
        self.lock().held -= cost;
        self.room.notify_one();
    }

    /// Queues `job`, first calling `start` (under the lock; true if a
    /// worker started) when queued jobs would outnumber idle workers and
    /// fewer than the maximum run. Returns the job back when no worker
    /// runs at all, or the queue is closed: the caller does it itself.
    pub fn dispatch(&self, job: T, start: impl FnOnce() -> bool) -> Option<T> {
        let mut s = self.lock();
        if s.closed {
            return Some(job);
        }
        if s.jobs.len() >= s.idle && s.workers < self.max_workers && start() {
            s.workers += 1;
        }
        if s.workers == 0 {
            return Some(job);
        }
        s.jobs.push_back(job);
        drop(s);
        self.work.notify_one();
        None
    }

    /// A worker's next job; None once the queue is closed and empty.
    pub fn take(&self) -> Option<T> {
        let mut s = self.lock();
        loop {
            if let Some(j) = s.jobs.pop_front() {
                return Some(j);
            }
            if s.closed {
                return None;
            }
            s.idle += 1;
            s = self.work.wait(s).unwrap_or_else(|p| p.into_inner());
            s.idle -= 1;
        }
    }

    /// No more jobs: workers finish the queued ones and end, and a
    /// reader waiting for room goes on (a worker that failed closes the
    /// queue so that nothing waits for the room it held).
    pub fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
        self.room.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Bytes held now (for tests).
    pub fn held(&self) -> u64 {
        self.lock().held
    }
}
