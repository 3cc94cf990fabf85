//! Planning: a read or write request's data is mapped through the image
//! extent by extent; data extents go to the ring, the rest through the
//! bounce buffer; a write extent whose cluster another request is
//! allocating parks the request.

use log::error;
use qcow2::{Mapping, PendingWrite};

use super::{Worker, BOUNCE_LEN};
use crate::request::Kind;

impl Worker {
    /// Maps and issues the rest of a read or write request's data; parks
    /// it at a write extent whose cluster another request is allocating.
    pub(super) fn plan(&mut self, idx: usize) {
        let write = self.slots[idx].req.kind == Some(Kind::Out);
        while !self.slots[idx].failed && self.slots[idx].done < self.slots[idx].req.len {
            if self.ring.is_wedged() {
                // Nothing reaches the file through a wedged ring: fail
                // the rest rather than hold clusters for good.
                self.slots[idx].failed = true;
                break;
            }
            let slot = &self.slots[idx];
            let done = slot.done;
            let off = slot.req.offset + done;
            let rem = slot.req.len - done;
            let step = if write {
                self.plan_write_extent(idx, off, rem)
            } else {
                self.plan_read_extent(idx, off, rem)
            };
            match step {
                Ok(Some(n)) => self.slots[idx].done += n,
                Ok(None) => {
                    let slot = &mut self.slots[idx];
                    if !slot.parked {
                        slot.parked = true;
                        self.parked.push_back(idx);
                    }
                    return;
                }
                Err(e) => {
                    error!(
                        "{} at offset {off}: {e}",
                        if write { "write" } else { "read" }
                    );
                    self.slots[idx].failed = true;
                }
            }
        }
        self.maybe_complete(idx);
    }

    /// Issues one read extent; returns the bytes it covers.
    fn plan_read_extent(&mut self, idx: usize, off: u64, rem: u64) -> qcow2::Result<Option<u64>> {
        let done = self.slots[idx].done;
        // Raw images map the whole rest at the guest offset.
        let (m, n) = self.img.map_read(off, rem)?;
        match m {
            Mapping::Data(host) => self.issue(idx, done, n, host.0, false, None),
            other => {
                // Zeros, the backing image, compressed data: synchronous,
                // through the bounce buffer.
                let mem = self.slots[idx].mem.clone().expect("mem");
                let mut k = 0u64;
                while k < n {
                    let c = (n - k).min(BOUNCE_LEN as u64) as usize;
                    let buf = &mut self.bounce[..c];
                    self.img.read_mapped(other, buf, off + k)?;
                    if !self.slots[idx].req.write_data(&*mem, done + k, buf) {
                        return Err(qcow2::Error::io(
                            "guest buffer",
                            std::io::Error::other("not writable"),
                        ));
                    }
                    k += c as u64;
                }
            }
        }
        Ok(Some(n))
    }

    /// Issues one write extent; `None` when the request must wait.
    fn plan_write_extent(&mut self, idx: usize, off: u64, rem: u64) -> qcow2::Result<Option<u64>> {
        let done = self.slots[idx].done;
        let len = rem.min(usize::MAX as u64 >> 1) as usize;
        let Some(w) = self.img.clone().try_begin_write(off, len, &self.waker)? else {
            return Ok(None);
        };
        let (n, host) = (w.len() as u64, w.host().0);
        self.issue(idx, done, n, host, true, Some(w));
        Ok(Some(n))
    }
}

/// Ends a write extent once its data I/O is over: commits it when the
/// data was written, rolls it back (drops it) when not. False when the
/// commit failed.
pub(super) fn end_write(w: PendingWrite, written: bool) -> bool {
    if !written {
        drop(w);
        return true;
    }
    match w.commit() {
        Ok(()) => true,
        Err(e) => {
            error!("write commit: {e}");
            false
        }
    }
}
