//! virtio-mmio transport, version 2 (virtio 1.2 spec, section 4.2.2 "MMIO
//! Device Register Layout"), in front of a vhost-user backend.
//!
//! Data queue notifications rarely reach this code: each data queue's
//! QueueNotify write is a KVM ioeventfd that the backend reads directly,
//! and the backend signals used buffers through an irqfd on the device's
//! IOAPIC pin. Because the VMM cannot see those signals, InterruptStatus
//! always reports a used-buffer interrupt once the device runs (the driver
//! then checks its rings, which is harmless when nothing is new).
//!
//! The configuration-change bit is the VMM's own, and the only one
//! InterruptACK clears: it is set when the VMM marks the device failed
//! (NEEDS_RESET) or the backend announces a configuration change on its
//! request channel (backend_req.rs), and raised on the same irqfd, the
//! device's one interrupt line.
//!
//! A multiqueue NIC's control queue is the exception: it has no
//! ioeventfd, so its QueueNotify write exits here and the VMM answers the
//! commands itself (net_ctrl.rs) and raises the same irqfd. A data queue
//! notification that reaches the VMM (one without an ioeventfd, see
//! `vmm.rs`, or a write KVM did not match) is passed on to the queue's
//! kick eventfd.
//!
//! A device whose backend went away and may come back (`reconnect=SECS`,
//! reconnect.rs) keeps taking register writes: they change the state
//! kept here (started rings, enabled pairs, a reset) and nothing is sent
//! until the watcher hands a new backend the device through
//! [`MmioDevice::reconnect`].

use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::memory::{Mem, Region};
use crate::net_ctrl::CtrlQueue;
use crate::reconnect::{Health, Link};
use crate::replay::{Base, Desired};
use crate::vhost_user::{Backend, Kind, RingAddrs, NET_F_CTRL_VQ, NET_F_MQ};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x474d_4952; // "RIMG"
/// Largest ring the driver may choose.
pub const QUEUE_MAX: u16 = 256;

pub const REG_QUEUE_NOTIFY: u64 = 0x50;

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;
const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

#[derive(Default, Clone, Copy)]
struct Queue {
    ready: bool,
    ring: RingAddrs,
}

pub struct MmioDevice {
    backend: Backend,
    regions: Vec<Region>,
    memfd: i32,
    /// Guest RAM, for the control queue the VMM runs itself.
    mem: Mem,
    /// One per backend queue; a notification that exits to the VMM is
    /// written here.
    kicks: Vec<EventFd>,
    call: EventFd,
    health: Arc<Health>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    status: u32,
    config_generation: u32,
    /// Backend rings started at DRIVER_OK (enabled or not).
    running: Vec<usize>,
    /// The NIC's control queue while the device runs (CTRL_VQ
    /// negotiated), and its index.
    ctrl: Option<(usize, CtrlQueue)>,
    /// Queue pairs the backend has enabled (multiqueue NIC).
    active_pairs: u16,
}

impl MmioDevice {
    pub fn new(
        backend: Backend,
        regions: Vec<Region>,
        memfd: i32,
        mem: Mem,
        kicks: Vec<EventFd>,
        call: EventFd,
        health: Arc<Health>,
    ) -> MmioDevice {
        let n = backend.device_queues();
        MmioDevice {
            backend,
            regions,
            memfd,
            mem,
            kicks,
            call,
            health,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![Queue::default(); n],
            status: 0,
            config_generation: 0,
            running: Vec::new(),
            ctrl: None,
            active_pairs: 0,
        }
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn status(&self) -> u32 {
        if self.health.failed() {
            self.status | STATUS_NEEDS_RESET
        } else {
            self.status
        }
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            let cfg = &self.backend.config;
            for (i, b) in data.iter_mut().enumerate() {
                *b = cfg.get((offset - 0x100) as usize + i).copied().unwrap_or(0);
            }
            return;
        }
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.backend.kind.device_id(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.backend.features as u32,
                1 => (self.backend.features >> 32) as u32,
                _ => 0,
            },
            0x34 if self.queue().is_some() => QUEUE_MAX as u32,
            0x44 => self.queue().is_some_and(|q| q.ready) as u32,
            0x60 => {
                let running = if self.running.is_empty() {
                    0
                } else {
                    INT_VRING
                };
                running | self.health.interrupt_status.load(Ordering::Acquire)
            }
            0x70 => self.status(),
            0xfc => self.config_generation,
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            // Config writes (e.g. virtio-blk's writeback toggle) are not
            // forwarded; the backend's values stand.
            return;
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        let lo_hi = |old: u64, hi: bool| {
            if hi {
                (old & 0xffff_ffff) | ((v as u64) << 32)
            } else {
                (old & !0xffff_ffff) | v as u64
            }
        };
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => match self.driver_features_sel {
                0 => self.driver_features = lo_hi(self.driver_features, false),
                1 => self.driver_features = lo_hi(self.driver_features, true),
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                if let Some(q) = self.queue() {
                    q.ring.size = (v as u16).min(QUEUE_MAX);
                }
            }
            0x44 => {
                if let Some(q) = self.queue() {
                    q.ready = v == 1;
                }
            }
            REG_QUEUE_NOTIFY => self.notify(v as usize),
            0x64 => {
                self.health
                    .interrupt_status
                    .fetch_and(!(v & INT_CONFIG), Ordering::AcqRel);
            }
            0x70 => self.set_status(v),
            0x80 | 0x84 => {
                if let Some(q) = self.queue() {
                    q.ring.desc = lo_hi(q.ring.desc, offset == 0x84);
                }
            }
            0x90 | 0x94 => {
                if let Some(q) = self.queue() {
                    q.ring.avail = lo_hi(q.ring.avail, offset == 0x94);
                }
            }
            0xa0 | 0xa4 => {
                if let Some(q) = self.queue() {
                    q.ring.used = lo_hi(q.ring.used, offset == 0xa4);
                }
            }
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            self.status = v & !STATUS_FEATURES_OK;
            return;
        }
        let starting = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = v;
        if starting && !self.health.failed() {
            if let Err(e) = self.start() {
                self.backend_error(e);
            }
        }
    }

    /// An exchange with the backend failed: the device waits for a
    /// backend to come back if the connection broke and it may
    /// (the watcher reconnects and replays), and fails otherwise.
    fn backend_error(&mut self, e: Error) {
        if e.backend_lost() && self.health.reconnect.enabled() {
            self.health.lost();
        } else {
            eprintln!("rimg-vmm: {e}; device marked failed");
            self.fail();
        }
    }

    /// Whether messages go to the backend now; false while it is away
    /// (the state is kept for the replay) or the device failed.
    fn linked(&self) -> bool {
        self.health.link() == Link::Up
    }

    /// Whether FEATURES_OK may be set: nothing the device did not offer,
    /// and MQ only with CTRL_VQ (virtio 1.2, 5.1.3.1: MQ requires
    /// CTRL_VQ; the pairs are chosen on the control queue).
    fn features_acceptable(&self) -> bool {
        let f = self.driver_features;
        let net_ok = self.backend.kind != Kind::Net || f & NET_F_MQ == 0 || f & NET_F_CTRL_VQ != 0;
        f & !self.backend.features == 0 && net_ok
    }

    fn negotiated(&self, bit: u64) -> bool {
        self.driver_features & bit != 0
    }

    /// Where the control queue is (virtio 1.2, 5.1.2 "Virtqueues"): after
    /// the N data pairs with MQ, N = max_virtqueue_pairs; otherwise index
    /// 2 (one pair). None without CTRL_VQ.
    fn ctrl_index(&self) -> Option<usize> {
        let pairs = self.backend.max_pairs?;
        if !self.negotiated(NET_F_CTRL_VQ) {
            return None;
        }
        Some(if self.negotiated(NET_F_MQ) {
            2 * usize::from(pairs)
        } else {
            2
        })
    }

    /// DRIVER_OK: the ready data rings go to the backend, the control
    /// queue (if any) stays here. With MQ only the first pair is enabled
    /// until the driver's VQ_PAIRS_SET (virtio 1.2, 5.1.6.5.5: the device
    /// starts with one pair).
    fn start(&mut self) -> Result<()> {
        let ctrl = self.ctrl_index();
        // Without MQ a multiqueue-capable NIC has one pair (and the
        // control queue, if any, sits where the second pair would be).
        let data_queues = if self.backend.max_pairs.is_some() && !self.negotiated(NET_F_MQ) {
            2
        } else {
            self.backend.queues
        };
        self.running = self
            .queues
            .iter()
            .enumerate()
            .take(data_queues)
            .filter(|(_, q)| q.ready && q.ring.size > 0)
            .map(|(i, _)| i)
            .collect();
        self.active_pairs = 1;
        self.ctrl = None;
        if self.linked() {
            self.apply(Base::Zero)?;
        }
        if let Some(i) = ctrl {
            let q = self.queues[i];
            let max_pairs = if self.negotiated(NET_F_MQ) {
                self.backend.max_pairs.unwrap_or(1)
            } else {
                1
            };
            if !q.ready {
                eprintln!("rimg-vmm: net control queue {i} not set up by the driver; ignored");
            } else {
                match CtrlQueue::new(
                    q.ring,
                    self.negotiated(F_EVENT_IDX),
                    &self.mem,
                    max_pairs,
                    self.negotiated(NET_F_MQ),
                ) {
                    Ok(c) => self.ctrl = Some((i, c)),
                    Err(e) => eprintln!("rimg-vmm: net control queue {i}: {e}; ignored"),
                }
            }
        }
        Ok(())
    }

    /// Gives the backend the device as the driver set it up (replay.rs).
    fn apply(&mut self, base: Base) -> Result<()> {
        let rings: Vec<(usize, RingAddrs)> = self
            .running
            .iter()
            .map(|&i| (i, self.queues[i].ring))
            .collect();
        // With MQ the pairs the driver enabled (VQ_PAIRS_SET), all
        // started rings otherwise.
        let enabled: Vec<usize> = if self.negotiated(NET_F_MQ) {
            let end = 2 * usize::from(self.active_pairs);
            self.running.iter().copied().filter(|&i| i < end).collect()
        } else {
            self.running.clone()
        };
        self.backend.apply(&Desired {
            driver_features: self.driver_features,
            regions: &self.regions,
            memfd: self.memfd,
            mem: &self.mem,
            rings: &rings,
            enabled: &enabled,
            kicks: &self.kicks,
            call: &self.call,
            base,
        })
    }

    /// A backend took the place of the one that went away (on the
    /// connection `stream`): the handshake, then, if the driver had
    /// started the device, the replay of its rings where the guest's
    /// used indexes are, and one interrupt for completions the old
    /// backend published without signalling. A config space that changed
    /// meanwhile is announced as the request channel's change would be.
    /// The link is up again before the lock is released, so register
    /// writes that waited for it go to the new backend. Returns the
    /// number of reconnects so far.
    pub fn reconnect(&mut self, stream: UnixStream) -> Result<u64> {
        let changed = self.backend.reconnect(stream)?;
        let started = self.status & STATUS_DRIVER_OK != 0;
        if started {
            self.apply(Base::GuestUsed)?;
        }
        let n = self.health.restored();
        if changed {
            self.config_generation = self.config_generation.wrapping_add(1);
            if started {
                config_interrupt(&self.health, &self.call);
            }
        }
        if started && !self.running.is_empty() {
            let _ = self.call.write(1);
        }
        Ok(n)
    }

    /// The backend connection's descriptor, for the watcher.
    pub fn backend_fd(&self) -> i32 {
        self.backend.raw_fd()
    }

    /// A QueueNotify write that KVM did not turn into an ioeventfd.
    fn notify(&mut self, q: usize) {
        if self.status & STATUS_DRIVER_OK == 0 {
            // The driver must not notify before DRIVER_OK (virtio 1.2,
            // 3.1.1): nothing runs yet.
            return;
        }
        if self.ctrl.as_ref().is_some_and(|(i, _)| *i == q) {
            self.process_ctrl();
        } else if self.running.contains(&q) {
            if let Some(k) = self.kicks.get(q) {
                let _ = k.write(1);
            }
        }
    }

    fn process_ctrl(&mut self) {
        let Some((i, mut ctrl)) = self.ctrl.take() else {
            return;
        };
        let mem = self.mem.clone();
        let interrupt = ctrl.process(&mem, |n| self.set_active_pairs(n));
        self.ctrl = Some((i, ctrl));
        if interrupt {
            // The ack is a used buffer: the device's one interrupt line,
            // which InterruptStatus reports as VRING while running.
            let _ = self.call.write(1);
        }
    }

    /// VQ_PAIRS_SET(n), already checked against max_virtqueue_pairs:
    /// enables pairs 0..n in the backend and disables the others
    /// (SET_VRING_ENABLE; rimg-vhost-net attaches and detaches its TAP
    /// queues to match). False if a pair's rings never started or the
    /// backend refused.
    fn set_active_pairs(&mut self, n: u16) -> bool {
        if self.health.failed() {
            return false;
        }
        let rings = |p: u16| [2 * usize::from(p), 2 * usize::from(p) + 1];
        if let Some(p) = (0..n).find(|&p| rings(p).iter().any(|r| !self.running.contains(r))) {
            eprintln!(
                "rimg-vmm: net control queue: VQ_PAIRS_SET {n}, but pair {p} was not set up by the driver"
            );
            return false;
        }
        if !self.linked() {
            // Enabled by the replay.
            self.active_pairs = n;
            return true;
        }
        let max = self.backend.max_pairs.unwrap_or(1);
        let mut enable = Vec::new();
        let mut disable = Vec::new();
        for p in 0..max {
            let (want, was) = (p < n, p < self.active_pairs);
            let list = if want { &mut enable } else { &mut disable };
            if want != was {
                list.extend(rings(p).into_iter().filter(|r| self.running.contains(r)));
            }
        }
        let r = self
            .backend
            .set_rings_enabled(&disable, false)
            .and_then(|()| self.backend.set_rings_enabled(&enable, true));
        match r {
            Ok(()) => {
                self.active_pairs = n;
                true
            }
            Err(e) if e.backend_lost() && self.health.reconnect.enabled() => {
                self.health.lost();
                self.active_pairs = n;
                true
            }
            Err(e) => {
                eprintln!("rimg-vmm: net control queue: VQ_PAIRS_SET {n}: {e}");
                false
            }
        }
    }

    /// Marks the device as needing a reset and tells the driver.
    pub fn fail(&mut self) {
        self.health.fail();
        config_interrupt(&self.health, &self.call);
    }

    /// The backend announced a configuration change (on its request
    /// channel): the config space is fetched again (GET_CONFIG, on the
    /// connection this device's lock guards), ConfigGeneration moves on
    /// so a driver reading the fields across the change reads again
    /// (virtio 1.2, 2.5.1 and 4.2.2), and a running device (DRIVER_OK)
    /// raises the configuration-change interrupt. Before DRIVER_OK the
    /// driver reads the new values when it gets to them. While the
    /// backend is away there is nothing to fetch: the replay reads the
    /// config space of the one that comes back.
    pub fn config_changed(&mut self) -> Result<()> {
        if !self.linked() {
            return Ok(());
        }
        match self.backend.refresh_config() {
            Err(e) if e.backend_lost() && self.health.reconnect.enabled() => {
                self.health.lost();
                return Ok(());
            }
            r => r?,
        }
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & STATUS_DRIVER_OK != 0 {
            config_interrupt(&self.health, &self.call);
        }
        Ok(())
    }

    fn reset(&mut self) {
        if !self.running.is_empty() && self.linked() {
            let running = std::mem::take(&mut self.running);
            match self.backend.stop(&running) {
                Err(e) if e.backend_lost() && self.health.reconnect.enabled() => self.health.lost(),
                Err(e) => eprintln!("rimg-vmm: {e}"),
                Ok(()) => {}
            }
        }
        // No request of the old rings is pending any more.
        self.backend.drop_inflight();
        self.running.clear();
        self.ctrl = None;
        self.active_pairs = 0;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = Queue::default();
        }
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

/// Raises a configuration-change interrupt: the driver then reads the
/// status (NEEDS_RESET) and the config space.
pub fn config_interrupt(health: &Health, call: &EventFd) {
    health
        .interrupt_status
        .fetch_or(INT_CONFIG, Ordering::AcqRel);
    let _ = call.write(1);
}
