//! The vhost-user backend: queues 2i (RX) and 2i + 1 (TX) form pair i,
//! served by thread i ([`PairWorker`]) with its own io_uring and TAP
//! queue.
//!
//! The vhost-user protocol, threads, event routing and teardown hooks are
//! the shared layer's ([`rimg_vhost_server::device`], [`Workers`]); this
//! is what is specific to a NIC.

use std::sync::Arc;

use log::error;
use rimg_vhost_server::workers::Workers;
use vhost::vhost_user::message::VhostUserProtocolFeatures;

use crate::config::{Negotiated, NetConfig};
use crate::control::NetControl;
use crate::tap::Tap;
use crate::worker::PairWorker;
use rimg_vhost_server::GM;

pub struct NetBackend {
    cfg: NetConfig,
    tap: Arc<Tap>,
    workers: Workers<PairWorker>,
    control: Arc<NetControl>,
}

impl NetBackend {
    pub fn new(
        cfg: NetConfig,
        tap: Arc<Tap>,
        mem: GM,
        control: Arc<NetControl>,
    ) -> std::io::Result<NetBackend> {
        let mut workers = Vec::new();
        for p in 0..usize::from(cfg.queue_pairs) {
            workers.push(PairWorker::new(p, tap.clone(), mem.clone())?);
        }
        control.attach(workers.iter().map(|w| w.stats.clone()).collect());
        Ok(NetBackend {
            cfg,
            tap,
            workers: Workers::new(workers)?,
            control,
        })
    }
}

impl rimg_vhost_server::Device for NetBackend {
    type Worker = PairWorker;

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

    fn config_space(&self) -> Vec<u8> {
        self.cfg.encode().to_vec()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn workers(&self) -> &Workers<PairWorker> {
        &self.workers
    }

    fn disconnected(&self) {
        self.workers.for_each(|w| {
            w.quiesce();
            let [tx, tx_gso, tx_dropped, rx, rx_gso, rx_dropped] = w.stats.values();
            log::info!(
                "pair {}: tx {tx} frames ({tx_gso} gso, {tx_dropped} dropped), \
                 rx {rx} frames ({rx_gso} gso, {rx_dropped} dropped)",
                w.pair(),
            );
        });
        self.control.detach();
    }
}
