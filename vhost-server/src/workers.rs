//! The part of a vhost-user backend both daemons share: one worker per
//! thread, each serving a fixed number of consecutive queues with its own
//! epoll loop and io_uring. This module owns the workers, routes the
//! framework's events to them and answers the framework's questions about
//! threads; a daemon's backend keeps only what is specific to its device
//! (features, config space, what a disconnect must finish).
//!
//! Event ids a worker thread sees (local to the thread): its queues' kicks
//! are `0..queues_per_thread`, the framework's exit / vring-enabled event
//! is `num_queues`, and the worker's io_uring completion eventfd is
//! registered as `num_queues + 1` ([`Workers::listeners`]).

use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::{ExitEvents, Vring};

/// A daemon's per-thread worker, as [`Workers`] drives it.
pub trait QueueWorker: Send {
    /// Consecutive queues one worker serves (1 for a block queue, 2 for
    /// a net RX/TX pair).
    const QUEUES_PER_THREAD: usize;
    /// The eventfd its io_uring signals completions on.
    fn completion_fd(&self) -> RawFd;
    fn set_event_idx(&mut self, on: bool);
    /// A kick (`event` below `QUEUES_PER_THREAD`) or the vring-enabled
    /// event for this worker's `vrings`.
    fn handle_kick(&mut self, event: u16, vrings: &[Vring]);
    /// Its io_uring completion eventfd fired.
    fn handle_completions(&mut self);
    /// The frontend stopped one of its queues: end what is in flight;
    /// nothing may be returned into a stopped ring afterwards.
    fn stop(&mut self);
    /// One or more lines on what it holds, for the SIGUSR1 state dump.
    fn state(&self) -> String;
}

/// The workers of one connection.
pub struct Workers<W> {
    workers: Vec<Mutex<W>>,
    exits: ExitEvents,
}

impl<W: QueueWorker> Workers<W> {
    pub fn new(workers: Vec<W>) -> std::io::Result<Workers<W>> {
        Ok(Workers {
            exits: ExitEvents::new(workers.len())?,
            workers: workers.into_iter().map(Mutex::new).collect(),
        })
    }

    /// Worker threads.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Worker `t`. A worker whose thread panicked is still reachable: its
    /// state stays consistent enough to drain and drop, which teardown
    /// needs more than it needs the panic repeated.
    pub fn lock(&self, t: usize) -> MutexGuard<'_, W> {
        self.workers[t].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on every worker in turn.
    pub fn for_each(&self, mut f: impl FnMut(&mut W)) {
        for t in 0..self.workers.len() {
            f(&mut self.lock(t));
        }
    }

    /// VhostUserBackend::num_queues.
    pub fn num_queues(&self) -> usize {
        self.workers.len() * W::QUEUES_PER_THREAD
    }

    /// The id under which each worker's completion fd is registered.
    pub fn completion_event_id(&self) -> u64 {
        self.num_queues() as u64 + 1
    }

    /// Device::listeners: each worker's completion fd on its thread.
    pub fn listeners(&self) -> Vec<(usize, RawFd, u64)> {
        (0..self.workers.len())
            .map(|t| (t, self.lock(t).completion_fd(), self.completion_event_id()))
            .collect()
    }

    /// VhostUserBackend::queues_per_thread.
    pub fn queues_per_thread(&self) -> Vec<u64> {
        let mask = (1u64 << W::QUEUES_PER_THREAD) - 1;
        (0..self.workers.len())
            .map(|t| mask << (t * W::QUEUES_PER_THREAD))
            .collect()
    }

    /// VhostUserBackend::exit_event.
    pub fn exit_event(&self, t: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exits.get(t)
    }

    /// VhostUserBackend::set_event_idx.
    pub fn set_event_idx(&self, on: bool) {
        self.for_each(|w| w.set_event_idx(on));
    }

    /// VhostUserBackend::stop_vring: stops the worker serving the queue.
    pub fn stop_vring(&self, queue: u32) {
        let t = queue as usize / W::QUEUES_PER_THREAD;
        if t < self.workers.len() {
            self.lock(t).stop();
        }
    }

    /// VhostUserBackend::handle_event. Guest mistakes are handled by the
    /// worker (request errors, dropped frames), never returned: an error
    /// would stop the thread for good.
    pub fn handle_event(&self, event: u16, vrings: &[Vring], t: usize) -> std::io::Result<()> {
        // This thread reads guest rings: narrow what it may call first.
        crate::seccomp::enter_vring_worker();
        if vrings.len() < W::QUEUES_PER_THREAD || t >= self.workers.len() {
            return Ok(());
        }
        let mut w = self.lock(t);
        if u64::from(event) == self.completion_event_id() {
            w.handle_completions();
        } else {
            w.handle_kick(event, vrings);
        }
        Ok(())
    }

    /// Device::dump_state: every worker's state. A worker holds its lock
    /// while it handles an event, which may be at the very moment of the
    /// dump (a worker finishing the event that answered the driver's last
    /// request): the lock is retried until [`DUMP_PATIENCE`] has passed
    /// since the dump began, then a worker still holding it (stuck, or
    /// never idle) is said to be busy rather than waited for.
    pub fn dump_state(&self) -> String {
        self.dump_state_within(DUMP_PATIENCE)
    }

    fn dump_state_within(&self, patience: Duration) -> String {
        let deadline = Instant::now() + patience;
        let mut out = String::new();
        for (t, w) in self.workers.iter().enumerate() {
            match lock_before(w, deadline) {
                Some(w) => out.push_str(&w.state()),
                None => out.push_str(&format!(
                    "thread {t}: busy (its lock held for over {patience:?})"
                )),
            }
            out.push('\n');
        }
        out
    }
}

/// How long a state dump waits for the workers' locks, all together: a
/// worker handles an event in far less unless it is stuck.
pub const DUMP_PATIENCE: Duration = Duration::from_secs(2);

/// `m` locked (poisoned or not), if it is free at some moment before
/// `deadline`; tried at least once. Between tries the thread parks (a
/// futex wait, which every daemon thread may make; `thread::sleep`'s
/// clock_nanosleep is not in the daemons' seccomp filters).
fn lock_before<W>(m: &Mutex<W>, deadline: Instant) -> Option<MutexGuard<'_, W>> {
    loop {
        match m.try_lock() {
            Ok(g) => return Some(g),
            Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::park_timeout((deadline - now).min(Duration::from_millis(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Named(&'static str);

    impl QueueWorker for Named {
        const QUEUES_PER_THREAD: usize = 1;
        fn completion_fd(&self) -> RawFd {
            -1
        }
        fn set_event_idx(&mut self, _on: bool) {}
        fn handle_kick(&mut self, _event: u16, _vrings: &[Vring]) {}
        fn handle_completions(&mut self) {}
        fn stop(&mut self) {}
        fn state(&self) -> String {
            self.0.into()
        }
    }

    #[test]
    fn dump_waits_for_a_worker_that_is_handling_an_event() {
        let ws = Workers::new(vec![Named("queue 0"), Named("queue 1")]).unwrap();
        let (held, go) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        std::thread::scope(|s| {
            s.spawn(|| {
                let _g = ws.lock(1);
                held.wait();
                go.wait();
                std::thread::sleep(Duration::from_millis(100));
            });
            held.wait();
            go.wait();
            assert_eq!(ws.dump_state(), "queue 0\nqueue 1\n");
        });
    }

    #[test]
    fn dump_says_busy_once_its_patience_is_over() {
        let ws = Workers::new(vec![Named("queue 0"), Named("queue 1")]).unwrap();
        let _g = ws.lock(0);
        let start = Instant::now();
        let out = ws.dump_state_within(Duration::from_millis(50));
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert_eq!(
            out,
            "thread 0: busy (its lock held for over 50ms)\nqueue 1\n"
        );
    }
}
