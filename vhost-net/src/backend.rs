//! The vhost-user backend: queues 2i (RX) and 2i + 1 (TX) form pair i,
//! served by thread i with its own io_uring and TAP queue.
//!
//! Threads, event routing and teardown hooks are the shared
//! [`Workers`] layer's; this is what is specific to a NIC.

use std::os::fd::RawFd;
use std::sync::Arc;

use log::error;
use rimg_vhost_server::workers::{QueueWorker, Workers};
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
    workers: Workers<PairWorker>,
}

impl QueueWorker for PairWorker {
    const QUEUES_PER_THREAD: usize = 2;

    fn completion_fd(&self) -> RawFd {
        PairWorker::completion_fd(self)
    }

    fn set_event_idx(&mut self, on: bool) {
        PairWorker::set_event_idx(self, on)
    }

    fn handle_kick(&mut self, _event: u16, vrings: &[Vring]) {
        // Kicks, and the vring-enabled event: both may let frames move.
        PairWorker::handle_kick(self, &vrings[0], &vrings[1])
    }

    fn handle_completions(&mut self) {
        PairWorker::handle_completions(self)
    }

    fn stop(&mut self) {
        self.quiesce()
    }

    fn state(&self) -> String {
        PairWorker::state(self)
    }
}

impl NetBackend {
    pub fn new(cfg: NetConfig, tap: Arc<Tap>, mem: GM) -> std::io::Result<NetBackend> {
        let mut workers = Vec::new();
        for p in 0..usize::from(cfg.queue_pairs) {
            workers.push(PairWorker::new(p, tap.clone(), mem.clone())?);
        }
        Ok(NetBackend {
            cfg,
            tap,
            workers: Workers::new(workers)?,
        })
    }
}

impl rimg_vhost_server::Device for NetBackend {
    fn listeners(&self) -> Vec<(usize, RawFd, u64)> {
        self.workers.listeners()
    }

    fn dump_state(&self) -> String {
        self.workers.dump_state()
    }

    fn disconnected(&self) {
        self.workers.for_each(|w| {
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
        });
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.workers.num_queues()
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
        self.workers.for_each(|w| w.set_negotiated(n));
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
        self.workers.set_event_idx(enabled)
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
