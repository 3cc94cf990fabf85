//! A connection's requests answered: the split data path for reads and
//! writes in clear, the engine (in non-blocking mode) for the rest, and
//! the wake-up of parked requests (the protocol is in the parent
//! module's docs).

use io_uring::{opcode, types};

use nbd_proto::consts::cmd;
use qcow2::{Mapping, PendingWrite};
use rimg_vhost_server::inline;
use rimg_vhost_server::RingOwner;

use super::{Conn, Op, Stage, MAX_INFLIGHT};
use crate::transmission::Failure;

const INLINE_MAX: usize = 64 << 10;

impl Conn<'_> {
    /// Starts answering a request whose payload has arrived.
    pub(super) fn start(&mut self, idx: usize) {
        let size = self.img.size();
        let guards = self.guards_first_sector;
        let s = &mut self.slots[idx];
        s.stage = Stage::Run;
        s.parked = false;
        s.failed = None;
        s.done = 0;
        s.pending = 0;
        s.ops.clear();
        let r = s.req;
        // Checked first: the range is then within the export.
        s.split = self.file.is_some()
            && r.len > 0
            && s.exec.check_data(&r).is_ok()
            && match r.kind {
                cmd::READ => true,
                // The engine checks a probed raw image's first sector
                // and grows a raw file into its padded tail.
                cmd::WRITE => {
                    s.plen as u64 == r.len
                        && !(guards && r.offset < 512)
                        && r.offset + r.len <= size
                }
                _ => false,
            };
        if !s.split {
            return self.run_engine(idx);
        }
        s.exec.out.clear();
        if r.kind == cmd::READ {
            s.at = s.exec.read_header(&r);
            s.exec.out.resize(s.at + r.len as usize, 0);
        }
        s.epoch = Some(self.img.io_epoch());
        self.plan(idx);
    }

    /// Runs a request in the engine, in non-blocking mode.
    fn run_engine(&mut self, idx: usize) {
        let s = &mut self.slots[idx];
        let answered =
            qcow2::sync::without_blocking(&self.waker, || s.exec.try_answer(&s.req, &s.data));
        match answered {
            true => self.reply(idx),
            false => self.park(idx),
        }
    }

    pub(super) fn park(&mut self, idx: usize) {
        let s = &mut self.slots[idx];
        if !s.parked {
            s.parked = true;
            self.parked.push(idx);
        }
    }

    /// Maps and issues the rest of a split read or write; parks it at a
    /// write extent whose cluster another request is allocating.
    pub(super) fn plan(&mut self, idx: usize) {
        loop {
            let s = &self.slots[idx];
            if s.stage != Stage::Run || s.failed.is_some() || s.done >= s.req.len {
                break;
            }
            if self.ring.is_wedged() {
                let f = Failure::host_io("data I/O", libc::EIO);
                self.slots[idx].failed = Some(f);
                break;
            }
            if self.ring.inflight() >= MAX_INFLIGHT {
                // Goes on as completions are reaped.
                return self.throttled.push(idx);
            }
            let off = s.req.offset + s.done;
            let rem = s.req.len - s.done;
            let step = match s.req.kind {
                cmd::WRITE => self.plan_write(idx, off, rem),
                _ => self.plan_read(idx, off, rem),
            };
            match step {
                Ok(Some(n)) => self.slots[idx].done += n,
                Ok(None) => return self.park(idx),
                Err(e) => self.slots[idx].failed = Some(e.into()),
            }
        }
        self.maybe_complete(idx);
    }

    /// Issues or reads one extent of a read; returns the bytes it covers.
    fn plan_read(&mut self, idx: usize, off: u64, rem: u64) -> qcow2::Result<Option<u64>> {
        let real = self.img.size();
        if off >= real {
            // A raw file's padded tail: zeros, already in the reply.
            return Ok(Some(rem));
        }
        let (m, n) = self.img.map_read(off, rem.min(real - off))?;
        let s = &mut self.slots[idx];
        let pos = s.done as usize;
        match m {
            Mapping::Data(host) => self.issue(idx, pos, n as usize, host.0, None),
            other => {
                let at = s.at + pos;
                assert!(at + n as usize <= s.exec.out.len());
                // SAFETY: in bounds (asserted); the range is this extent's
                // alone, which no ring read covers, and the slice is made
                // from the vector's pointer so that no reference spans the
                // ranges the kernel may be writing.
                let buf = unsafe {
                    std::slice::from_raw_parts_mut(s.exec.out.as_mut_ptr().add(at), n as usize)
                };
                self.img.read_mapped(other, buf, off)?;
            }
        }
        Ok(Some(n))
    }

    /// Issues one extent of a write; None when the request must wait.
    fn plan_write(&mut self, idx: usize, off: u64, rem: u64) -> qcow2::Result<Option<u64>> {
        let Some(w) = self
            .img
            .clone()
            .try_begin_write(off, rem as usize, &self.waker)?
        else {
            return Ok(None);
        };
        let n = w.len();
        let (pos, host) = (self.slots[idx].done as usize, w.host().0);
        self.issue(idx, pos, n, host, Some(w));
        Ok(Some(n as u64))
    }

    fn issue(&mut self, idx: usize, pos: usize, len: usize, host: u64, wio: Option<PendingWrite>) {
        let s = &mut self.slots[idx];
        let k = s.ops.len();
        s.ops.push(Op {
            pos,
            len,
            host,
            moved: 0,
            wio,
        });
        s.pending += 1;
        self.push_op(idx, k);
    }

    /// Puts (the rest of) op `k` of slot `idx` on the ring.
    fn push_op(&mut self, idx: usize, k: usize) {
        let file = types::Fd(self.file.expect("split path"));
        let s = &mut self.slots[idx];
        let op = &s.ops[k];
        let (pos, len, host) = (
            op.pos + op.moved,
            op.len - op.moved,
            op.host + op.moved as u64,
        );
        let sqe = match s.req.kind {
            cmd::WRITE => {
                let b = &s.data[pos..pos + len];
                let iov = [libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: len,
                }];
                // Buffered: written here (see `inline`), but for large
                // writes, which the ring overlaps with the next requests.
                if len <= INLINE_MAX {
                    // SAFETY: the iovec points into the payload, borrowed
                    // for the call.
                    return match unsafe { inline::write(file.0, &iov, host, len as u64) } {
                        // At most MAX_PAYLOAD bytes: an i32.
                        Ok(()) => self.data_done(idx, k, len as i32),
                        // Final: data_done would retry EAGAIN or EINTR
                        // (ring results), inline again, without end.
                        Err(e) => {
                            let errno = match e.raw_os_error() {
                                Some(libc::EAGAIN | libc::EINTR) | None => libc::EIO,
                                Some(n) => n,
                            };
                            self.data_done(idx, k, -errno)
                        }
                    };
                }
                opcode::Write::new(file, b.as_ptr(), len as u32)
                    .offset(host)
                    .build()
            }
            _ => {
                assert!(s.at + pos + len <= s.exec.out.len());
                // SAFETY: in bounds (asserted); a pointer, not a slice:
                // other reads may be writing elsewhere in the reply.
                let p = unsafe { s.exec.out.as_mut_ptr().add(s.at + pos) };
                opcode::Read::new(file, p, len as u32).offset(host).build()
            }
        };
        let sqe = sqe.user_data(((idx as u64) << 32) | k as u64);
        // SAFETY: the range lies in the slot's payload (a write) or its
        // reply (a read), which are not resized, moved or freed while
        // the slot's ops are in flight (`pending` > 0 keeps the slot in
        // `Stage::Run`; slots are freed only with the connection, after
        // the drain, or leaked with a wedged ring); the file is the
        // image's, which the session keeps open.
        unsafe { self.push_entry(&sqe) };
    }

    /// A data op ended with `res`.
    pub(super) fn data_done(&mut self, idx: usize, k: usize, res: i32) {
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return self.push_op(idx, k);
        }
        let s = &mut self.slots[idx];
        let write = s.req.kind == cmd::WRITE;
        let op = &mut s.ops[k];
        if res > 0 {
            op.moved += res as usize;
            if op.moved < op.len {
                return self.push_op(idx, k);
            }
        }
        let what = if write { "write" } else { "read" };
        let w = op.wio.take();
        if res == 0 && !write {
            // The end of the file: the rest reads as zeros (allocated
            // clusters never written past it), which the reply holds
            // already, as the engine's own reads return them.
        } else if res <= 0 {
            // Dropped: rolled back.
            drop(w);
            let errno = if res == 0 { libc::EIO } else { -res };
            s.failed.get_or_insert(Failure::host_io(what, errno));
        } else if let Some(w) = w {
            if let Err(e) = w.commit() {
                s.failed.get_or_insert(e.into());
            }
        }
        s.pending -= 1;
        self.maybe_complete(idx);
    }

    /// Replies to a split read or write once all of it is done.
    fn maybe_complete(&mut self, idx: usize) {
        let s = &mut self.slots[idx];
        let all = s.failed.is_some() || s.done >= s.req.len;
        if s.stage != Stage::Run || s.pending > 0 || s.parked || !all {
            return;
        }
        s.epoch = None;
        s.ops.clear();
        if s.failed.is_none() && s.req.kind == cmd::WRITE {
            match s.exec.fua(&s.req) {
                Ok(()) => s.exec.ok(&s.req),
                Err(f) => s.failed = Some(f),
            }
        }
        if let Some(f) = s.failed.take() {
            s.exec.out.clear();
            s.exec.error_reply(&s.req, &f);
        }
        self.reply(idx);
    }

    /// The waker's read completed with `res`: parked requests run again
    /// (an allocation they waited for ended).
    pub(super) fn woken(&mut self, res: i32) {
        if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN {
            // Not re-armed (it would fail again at once): the loop polls.
            let e = std::io::Error::from_raw_os_error(-res);
            log::error!("the connection's waker cannot be read ({e}): polling");
            self.poll_parked = true;
        } else if !self.closing {
            self.arm_wake();
        }
        self.retry_parked();
    }

    pub(super) fn retry_parked(&mut self) {
        for idx in std::mem::take(&mut self.parked) {
            let s = &mut self.slots[idx];
            s.parked = false;
            match s.split {
                true => self.plan(idx),
                false => self.run_engine(idx),
            }
        }
    }
}
