//! The vhost-user backend: queues 2i (RX) and 2i + 1 (TX) form pair i,
//! served by thread i with its own io_uring and TAP queue.
//!
//! Event ids in [`handle_event`](VhostUserBackend::handle_event) are local
//! to the thread: 0 is the pair's RX kick, 1 its TX kick, `num_queues` the
//! framework's exit / vring-enabled event, and `num_queues + 1` the pair's
//! io_uring completion eventfd.

use std::sync::{Arc, Mutex, MutexGuard};

use log::error;
use rimg_vhost_server::ExitEvents;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackend;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::config::{Negotiated, NetConfig};
use crate::tap::Tap;
use crate::worker::PairWorker;
use rimg_vhost_server::{Vring, GM};

pub struct NetBackend {
    cfg: NetConfig,
    tap: Arc<Tap>,
    workers: Vec<Mutex<PairWorker>>,
    exits: ExitEvents,
}

impl NetBackend {
    pub fn new(cfg: NetConfig, tap: Arc<Tap>, mem: GM) -> std::io::Result<NetBackend> {
        let mut workers = Vec::new();
        for p in 0..usize::from(cfg.queue_pairs) {
            workers.push(Mutex::new(PairWorker::new(p, tap.clone(), mem.clone())?));
        }
        Ok(NetBackend {
            cfg,
            tap,
            exits: ExitEvents::new(workers.len())?,
            workers,
        })
    }

    fn worker(&self, p: usize) -> MutexGuard<'_, PairWorker> {
        self.workers[p].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn completion_event_id(&self) -> u64 {
        self.workers.len() as u64 * 2 + 1
    }
}

impl rimg_vhost_server::Device for NetBackend {
    fn listeners(&self) -> Vec<(usize, std::os::fd::RawFd, u64)> {
        (0..self.workers.len())
            .map(|p| {
                (
                    p,
                    self.worker(p).completion_fd(),
                    self.completion_event_id(),
                )
            })
            .collect()
    }

    fn disconnected(&self) {
        for p in 0..self.workers.len() {
            let mut w = self.worker(p);
            w.quiesce();
            let s = w.stats;
            log::info!(
                "pair {}: tx {} frames ({} gso, {} dropped), rx {} frames ({} gso, {} dropped)",
                w.pair(),
                s.tx_frames,
                s.tx_gso,
                s.tx_dropped,
                s.rx_frames,
                s.rx_gso,
                s.rx_dropped
            );
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.workers.len() * 2
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        self.cfg.features()
    }

    fn acked_features(&self, features: u64) {
        let n = Negotiated::from_features(features);
        if let Err(e) = self.tap.set_offload(n.tap_offloads) {
            error!("{e}");
        }
        for p in 0..self.workers.len() {
            self.worker(p).set_negotiated(n);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // Not CONFIGURE_MEM_SLOTS: QEMU drives each queue pair as its own
        // vhost device on the one connection and would add the same memory
        // regions once per pair, which the handler refuses as overlapping;
        // SET_MEM_TABLE replaces the table and is idempotent.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        for p in 0..self.workers.len() {
            self.worker(p).set_event_idx(enabled);
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        rimg_vhost_server::config_window(&self.cfg.encode(), offset, size)
    }

    fn update_memory(&self, _mem: GM) -> std::io::Result<()> {
        // Workers share the framework's GuestMemoryAtomic and load the
        // current map for each burst.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.workers.len())
            .map(|p| 0b11u64 << (2 * p))
            .collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exits.get(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        if let Some(w) = self.workers.get(queue_index as usize / 2) {
            w.lock().unwrap_or_else(|e| e.into_inner()).quiesce();
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
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Ok(());
        };
        let mut w = self.worker(thread_id);
        if u64::from(device_event) == self.completion_event_id() {
            w.handle_completions();
        } else {
            // Kicks, and the vring-enabled event: both may let frames move.
            w.handle_kick(rx, tx);
        }
        // Guest mistakes are dropped frames, never handler errors (an
        // error would stop this thread for good).
        Ok(())
    }
}
