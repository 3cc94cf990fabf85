//! The vhost-user backend every daemon serves: the framework's
//! `VhostUserBackend` answered once here, from what is specific to a
//! device ([`Device`]: features, config space, what a disconnect must
//! finish) and its [`Workers`] (threads, event routing, EVENT_IDX,
//! stopping queues).

use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackend;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::workers::{QueueWorker, Workers};
use crate::{Vring, GM};

/// What a daemon's device adds to the shared backend.
pub trait Device: Send + Sync + 'static {
    /// The per-thread worker serving its queues.
    type Worker: QueueWorker;

    /// This connection's workers.
    fn workers(&self) -> &Workers<Self::Worker>;
    /// Largest ring size the device takes.
    fn max_queue_size(&self) -> usize;
    /// virtio feature bits offered (with VHOST_USER_F_PROTOCOL_FEATURES).
    fn features(&self) -> u64;
    /// The frontend acked `features` (SET_FEATURES).
    fn acked_features(&self, _features: u64) {}
    fn protocol_features(&self) -> VhostUserProtocolFeatures;
    /// The device's whole configuration space, as the guest reads it.
    fn config_space(&self) -> Vec<u8>;
    /// A guest write into the configuration space; ignored unless the
    /// device has writable fields.
    fn set_config(&self, _offset: u32, _buf: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
    /// The connection's inflight region, for a device that offers
    /// INFLIGHT_SHMFD (the relay serves GET/SET_INFLIGHT_FD into it).
    fn inflight(&self) -> Option<&crate::inflight::Inflight> {
        None
    }
    /// The connection ended and the worker threads stopped: finish or
    /// drop what is still in flight.
    fn disconnected(&self);
    /// What the queues hold right now, for the state dump on SIGUSR1
    /// (must not block on a busy worker).
    fn dump_state(&self) -> String {
        self.workers().dump_state()
    }
}

/// The `size` bytes at `offset` of a device's config space `cfg`, zero
/// beyond its end (GET_CONFIG; the size is the frontend's and is capped).
pub fn config_window(cfg: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let (o, s) = (offset as usize, size as usize);
    let mut out = vec![0u8; s.min(4096)];
    if o < cfg.len() {
        let n = (cfg.len() - o).min(out.len());
        out[..n].copy_from_slice(&cfg[o..o + n]);
    }
    out
}

/// A device as the vhost-user framework drives it.
pub struct Backend<D>(pub Arc<D>);

impl<D> Clone for Backend<D> {
    fn clone(&self) -> Self {
        Backend(self.0.clone())
    }
}

impl<D: Device> VhostUserBackend for Backend<D> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.0.workers().num_queues()
    }

    fn max_queue_size(&self) -> usize {
        self.0.max_queue_size()
    }

    fn features(&self) -> u64 {
        self.0.features()
    }

    fn acked_features(&self, features: u64) {
        self.0.acked_features(features)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.0.protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.workers().set_event_idx(enabled)
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_window(&self.0.config_space(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        self.0.set_config(offset, buf)
    }

    fn update_memory(&self, _mem: GM) -> std::io::Result<()> {
        // Workers share the framework's GuestMemoryAtomic and load the
        // current map for each request or burst.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.0.workers().queues_per_thread()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.0.workers().exit_event(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        self.0.workers().stop_vring(queue_index);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        self.0
            .workers()
            .handle_event(device_event, vrings, thread_id)
    }
}
