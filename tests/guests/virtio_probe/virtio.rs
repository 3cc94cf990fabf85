//! virtio 1.x over virtio-mmio as the probe drives it: split rings of
//! eight entries in fixed guest memory, and the device initialisation of
//! virtio 1.2, 3.1.1.

use core::arch::asm;
use core::sync::atomic::{fence, Ordering};

use crate::io::{fill, print, r16, r32, rdtsc, w16, w32, w64};

// Guest memory used for rings and buffers (above the program, below
// anything rimg-vmm places: initrd is absent here).
pub const DESC: u64 = 0x0030_0000;
pub const AVAIL: u64 = 0x0030_1000;
pub const USED: u64 = 0x0030_2000;
/// Queue i's rings are at DESC/AVAIL/USED + i * QSTRIDE (up to NQ queues).
pub const QSTRIDE: u64 = 0x1_0000;
pub const NQ: usize = 5;
pub const BUF: u64 = 0x0040_0000;

pub struct Queue {
    pub idx: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    pub last_used: u16,
    pub avail_idx: u16,
}

impl Queue {
    pub fn new(idx: u16, size: u16) -> Queue {
        let off = idx as u64 * QSTRIDE;
        for a in [DESC + off, AVAIL + off, USED + off] {
            fill(a, 0x1000, |_| 0);
        }
        Queue {
            idx,
            desc: DESC + off,
            avail: AVAIL + off,
            used: USED + off,
            size,
            last_used: 0,
            avail_idx: 0,
        }
    }

    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + i as u64 * 16;
        w64(d, addr);
        w32(d + 8, len);
        w16(d + 12, flags);
        w16(d + 14, next);
    }

    pub fn push(&mut self, head: u16) {
        let slot = self.avail_idx % self.size;
        w16(self.avail + 4 + slot as u64 * 2, head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        w16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    /// Waits for the next used entry: (id, len), or None after `cycles`.
    pub fn pop(&mut self, cycles: u64) -> Option<(u32, u32)> {
        let start = rdtsc();
        while r16(self.used + 2) == self.last_used {
            if rdtsc() - start > cycles {
                return None;
            }
            // SAFETY: a spin-loop hint.
            unsafe { asm!("pause") };
        }
        fence(Ordering::SeqCst);
        let e = self.used + 4 + (self.last_used % self.size) as u64 * 8;
        self.last_used = self.last_used.wrapping_add(1);
        Some((r32(e), r32(e + 4)))
    }
}

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const SECOND: u64 = 3_000_000_000;

pub fn offered_features(base: u64) -> u64 {
    w32(base + 0x14, 0);
    let lo = r32(base + 0x10) as u64;
    w32(base + 0x14, 1);
    let hi = r32(base + 0x10) as u64;
    lo | (hi << 32)
}

/// Negotiates VERSION_1 plus `want` and sets up `nq` queues of 8.
pub fn init(base: u64, want: u64, nq: u16) -> Option<[Queue; NQ]> {
    w32(base + 0x70, 0);
    w32(base + 0x70, 1);
    w32(base + 0x70, 1 | 2);
    let offered = offered_features(base);
    if offered & (1 << 32) == 0 {
        print("no VERSION_1\n");
        return None;
    }
    let acked = (1 << 32) | (offered & want);
    w32(base + 0x24, 0);
    w32(base + 0x20, acked as u32);
    w32(base + 0x24, 1);
    w32(base + 0x20, (acked >> 32) as u32);
    w32(base + 0x70, 1 | 2 | 8);
    if r32(base + 0x70) & 8 == 0 {
        print("FEATURES_OK refused\n");
        return None;
    }
    let qs = [
        Queue::new(0, 8),
        Queue::new(1, 8),
        Queue::new(2, 8),
        Queue::new(3, 8),
        Queue::new(4, 8),
    ];
    for q in qs.iter().take(nq as usize) {
        w32(base + 0x30, q.idx as u32);
        if r32(base + 0x34) < 8 {
            print("queue too small\n");
            return None;
        }
        w32(base + 0x38, q.size as u32);
        w32(base + 0x80, q.desc as u32);
        w32(base + 0x84, (q.desc >> 32) as u32);
        w32(base + 0x90, q.avail as u32);
        w32(base + 0x94, (q.avail >> 32) as u32);
        w32(base + 0xa0, q.used as u32);
        w32(base + 0xa4, (q.used >> 32) as u32);
        w32(base + 0x44, 1);
    }
    w32(base + 0x70, 1 | 2 | 8 | 4);
    Some(qs)
}

pub fn notify(base: u64, q: &Queue) {
    w32(base + 0x50, q.idx as u32);
}
