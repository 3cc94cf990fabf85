//! The vhost-user backend: one worker (and one thread) per queue.
//!
//! Threads, event routing and teardown hooks are the shared
//! [`Workers`] layer's; this is what is specific to a block device.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::warn;
use qcow2::Image;
use rimg_vhost_server::workers::{QueueWorker, Workers};
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
    workers: Workers<Worker>,
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
    ) -> std::io::Result<BlkBackend> {
        let cfg = Arc::new(cfg);
        let writeback = Arc::new(AtomicBool::new(true));
        let mut workers = Vec::new();
        for q in 0..usize::from(cfg.num_queues) {
            workers.push(Worker::new(
                q,
                img.clone(),
                files.clone(),
                cfg.clone(),
                writeback.clone(),
                mem.clone(),
            )?);
        }
        Ok(BlkBackend {
            img,
            cfg,
            writeback,
            workers: Workers::new(workers)?,
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
    fn listeners(&self) -> Vec<(usize, RawFd, u64)> {
        self.workers.listeners()
    }

    fn dump_state(&self) -> String {
        let mut out = self.workers.dump_state();
        if let Some(state) = self.img.alloc_state() {
            out.push_str(&format!("image: {state}\n"));
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
        self.workers.set_event_idx(enabled)
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
        self.workers.queues_per_thread()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.workers.exit_event(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        self.workers.stop_vring(queue_index);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        self.workers.handle_event(device_event, vrings, thread_id)
    }
}
