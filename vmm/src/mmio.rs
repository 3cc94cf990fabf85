//! virtio-mmio transport, version 2 (virtio 1.2 spec, section 4.2.2 "MMIO
//! Device Register Layout"), in front of a vhost-user backend.
//!
//! Queue notifications never reach this code: each queue's QueueNotify
//! write is a KVM ioeventfd that the backend reads directly, and the
//! backend signals used buffers through an irqfd on the device's IOAPIC
//! pin. Because the VMM cannot see those signals, InterruptStatus always
//! reports a used-buffer interrupt once the device runs (the driver then
//! checks its rings, which is harmless when nothing is new).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::memory::Region;
use crate::vhost_user::{Backend, RingAddrs};

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

#[derive(Default, Clone, Copy)]
struct Queue {
    ready: bool,
    ring: RingAddrs,
}

/// State a watcher thread shares with the transport: set when the
/// backend hangs up.
pub struct Health {
    pub failed: AtomicBool,
    pub interrupt_status: AtomicU32,
}

pub struct MmioDevice {
    backend: Backend,
    regions: Vec<Region>,
    memfd: i32,
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
    running: Vec<usize>,
}

impl MmioDevice {
    pub fn new(
        backend: Backend,
        regions: Vec<Region>,
        memfd: i32,
        kicks: Vec<EventFd>,
        call: EventFd,
        health: Arc<Health>,
    ) -> MmioDevice {
        let n = backend.queues;
        MmioDevice {
            backend,
            regions,
            memfd,
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
        }
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn status(&self) -> u32 {
        if self.health.failed.load(Ordering::Acquire) {
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
        if v & STATUS_FEATURES_OK != 0 && self.driver_features & !self.backend.features != 0 {
            // The driver accepted something never offered: refuse.
            self.status = v & !STATUS_FEATURES_OK;
            return;
        }
        let starting = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = v;
        if starting && !self.health.failed.load(Ordering::Acquire) {
            let rings: Vec<(usize, RingAddrs)> = self
                .queues
                .iter()
                .enumerate()
                .filter(|(_, q)| q.ready && q.ring.size > 0)
                .map(|(i, q)| (i, q.ring))
                .collect();
            match self.backend.start(
                self.driver_features,
                &self.regions,
                self.memfd,
                &rings,
                &self.kicks,
                &self.call,
            ) {
                Ok(()) => self.running = rings.iter().map(|r| r.0).collect(),
                Err(e) => {
                    eprintln!("rimg-vmm: {e}; device marked failed");
                    self.fail();
                }
            }
        }
    }

    /// Marks the device as needing a reset and tells the driver.
    pub fn fail(&mut self) {
        self.health.failed.store(true, Ordering::Release);
        notify_failed(&self.health, &self.call);
    }

    fn reset(&mut self) {
        if !self.running.is_empty() && !self.health.failed.load(Ordering::Acquire) {
            let running = std::mem::take(&mut self.running);
            if let Err(e) = self.backend.stop(&running) {
                eprintln!("rimg-vmm: {e}");
            }
        }
        self.running.clear();
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

/// Raises a configuration-change interrupt so the driver reads the
/// NEEDS_RESET status.
pub fn notify_failed(health: &Health, call: &EventFd) {
    health
        .interrupt_status
        .fetch_or(INT_CONFIG, Ordering::AcqRel);
    let _ = call.write(1);
}
