//! The vhost-user backend: one worker (and one thread) per queue.
//!
//! Event ids seen by [`handle_event`](VhostUserBackend::handle_event): each
//! thread serves one queue, so its kick is id 0; id `num_queues` is the
//! framework's exit / vring-enabled event; the queue's io_uring completion
//! eventfd is registered as `num_queues + 1`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::warn;
use qcow2::Image;
use rimg_vhost_server::ExitEvents;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackend;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::config::DeviceConfig;
use crate::worker::{DataFiles, Vring, Worker, GM};

pub struct BlkBackend {
    img: Arc<dyn Image>,
    cfg: Arc<DeviceConfig>,
    writeback: Arc<AtomicBool>,
    workers: Vec<Mutex<Worker>>,
    exits: ExitEvents,
}

impl BlkBackend {
    pub fn new(
        img: Arc<dyn Image>,
        files: Arc<DataFiles>,
        cfg: DeviceConfig,
        mem: GM,
    ) -> std::io::Result<BlkBackend> {
        let cfg = Arc::new(cfg);
        let writeback = Arc::new(AtomicBool::new(true));
        let mut workers = Vec::new();
        for q in 0..usize::from(cfg.num_queues) {
            workers.push(Mutex::new(Worker::new(
                q,
                img.clone(),
                files.clone(),
                cfg.clone(),
                writeback.clone(),
                mem.clone(),
            )?));
        }
        Ok(BlkBackend {
            img,
            cfg,
            writeback,
            exits: ExitEvents::new(workers.len())?,
            workers,
        })
    }

    /// The id under which queue `q`'s completion fd is registered.
    pub fn completion_event_id(&self) -> u64 {
        u64::from(self.cfg.num_queues) + 1
    }

    pub fn completion_fd(&self, q: usize) -> std::os::fd::RawFd {
        self.worker(q).completion_fd()
    }

    fn worker(&self, q: usize) -> MutexGuard<'_, Worker> {
        self.workers[q].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Finishes all in-flight and parked requests of every queue, once
    /// the worker threads are gone. A parked request may wait for an
    /// allocation whose write is in another queue's ring, which only
    /// draining that queue completes: so every queue is drained in turn,
    /// round after round, never blocking on another (each round ends
    /// every allocation, so the next one starts at least one request).
    pub fn drain(&self) {
        loop {
            let (mut left, mut wedged) = (false, false);
            for q in 0..self.workers.len() {
                let mut w = self.worker(q);
                left |= w.drain_stopped();
                wedged |= w.is_wedged();
            }
            // A wedged ring never ends its allocations: what waits for
            // them is dropped with the connection.
            if !left || wedged {
                break;
            }
        }
    }
}

impl rimg_vhost_server::Device for BlkBackend {
    fn listeners(&self) -> Vec<(usize, std::os::fd::RawFd, u64)> {
        (0..self.workers.len())
            .map(|q| (q, self.completion_fd(q), self.completion_event_id()))
            .collect()
    }

    fn dump_state(&self) -> String {
        let mut out = String::new();
        for (q, w) in self.workers.iter().enumerate() {
            // A worker busy right now (or blocked) is said to be, rather
            // than waited for.
            match w.try_lock() {
                Ok(w) => out.push_str(&w.state()),
                Err(std::sync::TryLockError::Poisoned(p)) => out.push_str(&p.into_inner().state()),
                Err(std::sync::TryLockError::WouldBlock) => {
                    out.push_str(&format!("queue {q}: busy (its lock is held)"))
                }
            }
            out.push('\n');
        }
        if let Some(q) = self.img.as_qcow2() {
            out.push_str(&format!("image: {}\n", q.alloc_state()));
        }
        out
    }

    fn disconnected(&self) {
        self.drain();
        if let Err(e) = self.img.flush() {
            warn!("flush after disconnect: {e}");
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        self.cfg.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        for q in 0..self.workers.len() {
            self.worker(q).set_event_idx(enabled);
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        rimg_vhost_server::config_window(
            &self.cfg.encode(self.writeback.load(Ordering::Relaxed)),
            offset,
            size,
        )
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        // Only the cache mode (writeback, offset 32) is writable.
        if offset == 32 && buf.len() == 1 {
            self.writeback.store(buf[0] != 0, Ordering::Relaxed);
            if buf[0] != 0 {
                return Ok(());
            }
            // Switching to write-through: later writes are flushed before
            // they complete; the ones completed so far are flushed now.
            return self.img.flush().map_err(std::io::Error::other);
        }
        warn!(
            "ignoring config write at offset {offset}, {} bytes",
            buf.len()
        );
        Ok(())
    }

    fn update_memory(&self, _mem: GM) -> std::io::Result<()> {
        // Workers share the framework's GuestMemoryAtomic and load the
        // current map for each request.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.cfg.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exits.get(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        if let Some(w) = self.workers.get(queue_index as usize) {
            w.lock().unwrap_or_else(|p| p.into_inner()).stop();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        // This thread reads guest rings: narrow what it may call first.
        rimg_vhost_server::seccomp::enter_vring_worker();
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        let mut w = self.worker(thread_id);
        if u64::from(device_event) == self.completion_event_id() {
            w.handle_completions();
        } else if device_event == 0 {
            w.handle_kick(vring);
        }
        // Errors in guest requests are completed as request errors: the
        // handler never fails, or the framework would stop this thread.
        Ok(())
    }
}
