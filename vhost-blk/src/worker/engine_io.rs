//! Reads and writes of images whose stored bytes are not the guest's
//! (encrypted qcow2, LUKS): the split data path cannot hand their host
//! ranges to the ring, so the engine does the whole request on the queue
//! thread (`read_at`/`write_at`, which decrypt and encrypt), a bounce
//! buffer's worth at a time.
//!
//! Blocking in the engine is safe here, unlike on the ring path: with no
//! data in any ring, an allocation never outlives the engine call that
//! began it, so a write waiting for another queue's allocation waits for
//! a thread that finishes it on its own. DISCARD, WRITE_ZEROES and FLUSH
//! take the same synchronous route as for images in clear (`slot`).

use log::error;

use super::{Worker, BOUNCE_LEN};
use crate::request::Kind;

impl Worker {
    /// Runs a read or write request through the engine and completes it.
    pub(super) fn engine_rw(&mut self, idx: usize) {
        let slot = &self.slots[idx];
        let write = slot.req.kind == Some(Kind::Out);
        let (off, len) = (slot.req.offset, slot.req.len);
        let mem = slot.mem.clone().expect("mem");
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BOUNCE_LEN as u64) as usize;
            let buf = &mut self.bounce[..n];
            let req = &self.slots[idx].req;
            let r = if write {
                if req.read_data(&*mem, done, buf) {
                    self.img.write_at(buf, off + done)
                } else {
                    Err(guest_buffer("not readable"))
                }
            } else {
                self.img.read_at(buf, off + done).and_then(|()| {
                    if req.write_data(&*mem, done, buf) {
                        Ok(())
                    } else {
                        Err(guest_buffer("not writable"))
                    }
                })
            };
            if let Err(e) = r {
                error!(
                    "{} at offset {}: {e}",
                    if write { "write" } else { "read" },
                    off + done
                );
                self.slots[idx].failed = true;
                break;
            }
            done += n as u64;
        }
        self.slots[idx].done = done;
        self.maybe_complete(idx);
    }
}

fn guest_buffer(why: &str) -> qcow2::Error {
    qcow2::Error::io("guest buffer", std::io::Error::other(why.to_string()))
}
