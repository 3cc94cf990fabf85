//! The vhost-user backend: one worker (and one thread) per queue.
//!
//! The vhost-user protocol, threads, event routing and teardown hooks are
//! the shared layer's ([`rimg_vhost_server::device`], [`Workers`]); this
//! is what is specific to a block device.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::warn;
use qcow2::Image;
use rimg_vhost_server::inflight::Inflight;
use rimg_vhost_server::workers::{QueueWorker, Workers};
use vhost::vhost_user::message::VhostUserProtocolFeatures;

use crate::config::DeviceConfig;
use crate::control::QueueStats;
use crate::worker::{DataFiles, Vring, Worker, GM};

pub struct BlkBackend {
    img: Arc<dyn Image>,
    cfg: Arc<DeviceConfig>,
    writeback: Arc<AtomicBool>,
    workers: Workers<Worker>,
    inflight: Inflight,
}

impl QueueWorker for Worker {
    const QUEUES_PER_THREAD: usize = 1;

    fn completion_fd(&self) -> RawFd {
        Worker::completion_fd(self)
    }

    fn set_event_idx(&mut self, on: bool) {
        Worker::set_event_idx(self, on)
    }

    fn handle_kick(&mut self, event: u16, vrings: &[Vring]) {
        // The vring-enabled event has nothing for a block queue to do.
        if event == 0 {
            Worker::handle_kick(self, &vrings[0])
        }
    }

    fn handle_completions(&mut self) {
        Worker::handle_completions(self)
    }

    fn stop(&mut self) {
        Worker::stop(self)
    }

    fn state(&self) -> String {
        Worker::state(self)
    }
}

impl BlkBackend {
    pub fn new(
        img: Arc<dyn Image>,
        files: Arc<DataFiles>,
        cfg: DeviceConfig,
        mem: GM,
        stats: &[Arc<QueueStats>],
    ) -> std::io::Result<BlkBackend> {
        let cfg = Arc::new(cfg);
        let writeback = Arc::new(AtomicBool::new(true));
        let inflight = Inflight::new(usize::from(cfg.num_queues));
        let mut workers = Vec::new();
        for q in 0..usize::from(cfg.num_queues) {
            workers.push(
                Worker::new(
                    q,
                    img.clone(),
                    files.clone(),
                    cfg.clone(),
                    writeback.clone(),
                    mem.clone(),
                    stats.get(q).cloned().unwrap_or_default(),
                )?
                .with_inflight(inflight.clone()),
            );
        }
        Ok(BlkBackend {
            img,
            cfg,
            writeback,
            workers: Workers::new(workers)?,
            inflight,
        })
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
                let mut w = self.workers.lock(q);
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
    type Worker = Worker;

    fn workers(&self) -> &Workers<Worker> {
        &self.workers
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        self.cfg.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // BACKEND_REQ: the channel `resize` announces a new capacity on.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // Served by the relay (vhost-user-backend refuses it); see
            // `worker::resubmit`.
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn inflight(&self) -> Option<&Inflight> {
        Some(&self.inflight)
    }

    fn config_space(&self) -> Vec<u8> {
        self.cfg
            .encode(self.writeback.load(Ordering::Relaxed))
            .to_vec()
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

    fn disconnected(&self) {
        self.drain();
        if let Err(e) = self.img.flush() {
            warn!("flush after disconnect: {e}");
        }
    }

    fn dump_state(&self) -> String {
        let mut out = self.workers.dump_state();
        if let Some(state) = self.img.alloc_state() {
            out.push_str(&format!("image: {state}\n"));
        }
        out
    }
}
