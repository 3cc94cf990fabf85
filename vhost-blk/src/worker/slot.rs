//! A request slot and its lifecycle: a decoded request starts (or is
//! answered at once when invalid), reads and writes go to planning (or,
//! for an encrypted image, to the engine),
//! DISCARD and WRITE_ZEROES run in the engine in non-blocking mode, and
//! a request that is done gets its status byte and goes to the used ring.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::error;
use qcow2::{IoEpoch, PendingWrite};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::Bytes;

use super::{Mem, Worker, S_IOERR, S_OK};
use crate::request::{Invalid, Kind, Request, ZeroSeg};

/// Host iovecs pointing into guest memory.
#[derive(Default)]
pub(super) struct IoVecs(pub(super) Vec<libc::iovec>);

// SAFETY: the pointers refer to guest memory mappings that the owning
// slot keeps alive (an Arc of the memory map); they are only handed to the
// kernel, never dereferenced by this process, so moving them between
// threads is as safe as moving the Arc.
unsafe impl Send for IoVecs {}

/// One data I/O in the ring.
pub(super) struct Op {
    pub(super) iov: IoVecs,
    /// Position of the op's data in the request's data stream.
    pub(super) at: u64,
    pub(super) host: u64,
    pub(super) write: bool,
    pub(super) expect: usize,
    /// The mapped write this op carries the data of.
    pub(super) wio: Option<PendingWrite>,
    /// Issued on the O_DIRECT fd (retried through the aligned bounce
    /// buffer on EINVAL).
    pub(super) direct: bool,
}

/// A request slot: the decoded request and its progress.
#[derive(Default)]
pub(super) struct Slot {
    pub(super) req: Request,
    pub(super) mem: Option<Arc<Mem>>,
    pub(super) busy: bool,
    /// Data bytes already mapped and issued.
    pub(super) done: u64,
    pub(super) pending: u32,
    pub(super) failed: bool,
    pub(super) parked: bool,
    pub(super) ops: Vec<Option<Op>>,
    /// Held while the request's mappings are in use.
    pub(super) epoch: Option<IoEpoch>,
    /// When the request was taken from the ring (for `query-stats`).
    pub(super) started: Option<std::time::Instant>,
}

impl Worker {
    pub(super) fn start(&mut self, idx: usize, parsed: Result<(), Invalid>) {
        if let Err(inv) = parsed {
            match inv {
                Invalid::NoStatus => {
                    self.warnings.warn(format_args!(
                        "request without a status descriptor: returned unanswered"
                    ));
                    self.finish(idx, None, 0);
                }
                Invalid::Status(st, why) => {
                    self.warnings.warn(format_args!("invalid request: {why}"));
                    self.finish(idx, Some(st), 0);
                }
            }
            return;
        }
        let slot = &mut self.slots[idx];
        slot.done = 0;
        slot.pending = 0;
        slot.failed = false;
        slot.parked = false;
        slot.ops.clear();
        match slot.req.kind.expect("parsed") {
            // The first sector of a probed raw image is written by the
            // engine, which checks it (its split path refuses it).
            Kind::Out if slot.req.offset < 512 && self.img.guards_first_sector() => {
                self.engine_rw(idx)
            }
            Kind::In | Kind::Out if self.data_in_clear => {
                slot.epoch = Some(self.img.io_epoch());
                self.plan(idx)
            }
            Kind::In | Kind::Out => self.engine_rw(idx),
            Kind::Flush => {
                if !self.drain() {
                    self.finish(idx, Some(S_IOERR), 0);
                    return;
                }
                let st = match self.img.flush() {
                    Ok(()) => S_OK,
                    Err(e) => {
                        error!("flush: {e}");
                        S_IOERR
                    }
                };
                self.finish(idx, Some(st), 0);
            }
            Kind::GetId => {
                let slot = &self.slots[idx];
                let mut id = [0u8; 20];
                let n = self.cfg.serial.len().min(20);
                id[..n].copy_from_slice(&self.cfg.serial[..n]);
                let n = (slot.req.len as usize).min(20);
                let mem = slot.mem.clone().expect("mem");
                let ok = slot.req.write_data(&*mem, 0, &id[..n]);
                self.finish(idx, Some(if ok { S_OK } else { S_IOERR }), n as u32);
            }
            Kind::Discard | Kind::WriteZeroes => {
                if !self.drain() {
                    self.finish(idx, Some(S_IOERR), 0);
                    return;
                }
                self.run_zero(idx);
            }
        }
    }

    /// Runs a discard or write-zeroes request. The engine does not wait
    /// for another request's allocation: the request is parked, the waker
    /// registered, and the whole request runs again when woken (zeroing is
    /// idempotent).
    pub(super) fn run_zero(&mut self, idx: usize) {
        let w = self.waker.clone();
        let st = qcow2::sync::without_blocking(&w, || self.zero_segments(idx));
        match st {
            Some(st) => self.finish(idx, Some(st), 0),
            None => {
                self.slots[idx].parked = true;
                self.parked.push_back(idx);
            }
        }
    }

    /// Retries a parked request: a read or write maps the rest of its
    /// data, a discard or write-zeroes runs again.
    pub(super) fn retry(&mut self, idx: usize) {
        self.slots[idx].parked = false;
        match self.slots[idx].req.kind {
            Some(Kind::Discard) | Some(Kind::WriteZeroes) => self.run_zero(idx),
            _ => self.plan(idx),
        }
    }

    /// The status of a discard or write-zeroes request, or None when it
    /// must wait for an allocation (non-blocking mode).
    pub(super) fn zero_segments(&mut self, idx: usize) -> Option<u8> {
        let slot = &self.slots[idx];
        let mem = slot.mem.clone().expect("mem");
        let write_zeroes = slot.req.kind == Some(Kind::WriteZeroes);
        let nsegs = slot.req.len / 16;
        for i in 0..nsegs {
            let mut b = [0u8; 16];
            if !slot.req.read_data(&*mem, i * 16, &mut b) {
                return Some(S_IOERR);
            }
            let Some(seg) = ZeroSeg::decode(&b) else {
                self.warnings.warn(format_args!(
                    "discard/write-zeroes segment with reserved flags"
                ));
                return Some(virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8);
            };
            if !write_zeroes && seg.unmap {
                return Some(virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8);
            }
            let Some((off, len)) = seg.byte_range(self.cfg.capacity()) else {
                self.warnings.warn(format_args!(
                    "discard/write-zeroes past the end of the disk"
                ));
                return Some(S_IOERR);
            };
            let r = if write_zeroes {
                self.img.write_zeroes(off, len, seg.unmap)
            } else {
                self.img.discard(off, len)
            };
            match r {
                Ok(()) => {}
                Err(qcow2::Error::WouldBlock) => return None,
                Err(e) => {
                    error!("discard/write-zeroes at {off} len {len}: {e}");
                    return Some(S_IOERR);
                }
            }
        }
        if write_zeroes && !self.writeback.load(Ordering::Relaxed) && self.img.flush().is_err() {
            return Some(S_IOERR);
        }
        Some(S_OK)
    }

    pub(super) fn maybe_complete(&mut self, idx: usize) {
        let slot = &self.slots[idx];
        if !slot.busy || slot.pending > 0 || slot.parked {
            return;
        }
        if !slot.failed && slot.done < slot.req.len {
            return;
        }
        let mut st = if slot.failed { S_IOERR } else { S_OK };
        let kind = slot.req.kind;
        let used = if kind == Some(Kind::In) {
            slot.req.len as u32
        } else {
            0
        };
        if st == S_OK && kind == Some(Kind::Out) && !self.writeback.load(Ordering::Relaxed) {
            // Write-through cache mode: durable before completion.
            if let Err(e) = self.img.flush() {
                error!("flush after write-through write: {e}");
                st = S_IOERR;
            }
        }
        self.finish(idx, Some(st), used);
    }

    /// Writes the status, returns the descriptor chain and frees the slot.
    pub(super) fn finish(&mut self, idx: usize, status: Option<u8>, data_len: u32) {
        let slot = &mut self.slots[idx];
        let mem = slot.mem.take().expect("mem");
        let mut used = 0;
        if let Some(st) = status {
            if mem.write_obj(st, slot.req.status).is_ok() {
                used = data_len + 1;
            } else {
                self.warnings
                    .warn(format_args!("status byte outside guest memory"));
            }
        }
        // Counted once answered: a request returned without a status (the
        // guest sees no answer) is a failure, and takes no latency sample.
        if let Some(t) = slot.started.take() {
            let took = (used > 0).then(|| t.elapsed());
            let ok = status == Some(S_OK) && used > 0;
            self.stats.answered(slot.req.kind, ok, slot.req.len, took);
        }
        slot.busy = false;
        slot.ops.clear();
        slot.epoch = None;
        let head = slot.req.head;
        self.free.push(idx);
        if let Some(v) = &self.vring {
            let mut g = v.get_mut();
            let q = g.get_queue_mut();
            if let Some(log) = &self.log {
                log.complete_begin(&[head]);
            }
            match q.add_used(&*mem, head, used) {
                // The used index is published (a release store): the
                // mark can go.
                Ok(()) => {
                    if let Some(log) = &self.log {
                        log.complete_end(&[head], q.next_used());
                    }
                }
                Err(e) => {
                    drop(g);
                    self.warnings.warn(format_args!("add_used: {e}"));
                }
            }
            self.need_signal = true;
        }
    }
}
