//! Guest data on the queue's io_uring: iovecs into guest memory become
//! READV/WRITEV at the mapped file offsets (buffered writes, and reads
//! from tmpfs, the worker makes itself: `inline`); what the ring cannot
//! take (unmapped or fragmented guest memory, buffers not aligned for
//! O_DIRECT, O_DIRECT refusals, reads past the end of the file) moves
//! synchronously through the bounce buffer.

use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types};
use log::error;
use qcow2::PendingWrite;
use rimg_vhost_server::RingOwner;
use vm_memory::{Address, GuestMemoryBackend};

use super::plan::end_write;
use super::slot::{IoVecs, Op};
use super::{Mem, Worker, BOUNCE_LEN, DIRECT_ALIGN, IOV_MAX};
use rimg_vhost_server::inline;

/// The server refuses images whose data is not in a host file (an NBD
/// export) before any worker starts.
const HOST_FILE: &str = "served images keep their data in a host file";

impl Worker {
    /// Queues the transfer of request data bytes [at, at + n) to or from
    /// file offset `host`.
    pub(super) fn issue(
        &mut self,
        idx: usize,
        at: u64,
        n: u64,
        host: u64,
        write: bool,
        wio: Option<PendingWrite>,
    ) {
        let mut iov = IoVecs::default();
        let slot = &mut self.slots[idx];
        let mem = slot.mem.clone().expect("mem");
        let ok = build_iovecs(&mem, &slot.req.segs, at, n, &mut iov.0);
        let direct = self.files.direct.is_some();
        if !ok || iov.0.len() > IOV_MAX || (direct && !direct_aligned(&iov.0, host, n)) {
            // Rare: memory that does not map, too fragmented for one
            // vectored call, or (with O_DIRECT) guest buffers not aligned
            // for it. Do it synchronously through the bounce buffer.
            let r = self.bounce_io(idx, at, n, host, write);
            if let Some(w) = wio {
                if !end_write(w, r.is_ok()) {
                    self.slots[idx].failed = true;
                }
            }
            if let Err(e) = r {
                error!("bounce I/O at {host}: {e}");
                self.slots[idx].failed = true;
            }
            return;
        }
        if !write && self.files.reads_here {
            // Buffered, from a file system in memory: read here
            // ([`inline::reads_here`]).
            let fd = self.img.data_storage().file().expect(HOST_FILE).as_raw_fd();
            // SAFETY: the iovecs point into guest memory that `mem` (an
            // Arc of the map, held across the call) keeps mapped, as the
            // ring's reads into the same buffers do (guest RAM is mapped
            // writable; the buffers are the request's device-writable
            // segments).
            let r = unsafe { inline::read(fd, &iov.0, host, n) };
            drop(mem);
            let r = match r {
                // Past the end of the file: zeros, as `reap` fills them.
                Ok(k) if k < n => self.bounce_io(idx, at + k, n - k, host + k, false),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                error!("read at file offset {host}: {e}");
                self.slots[idx].failed = true;
            }
            return;
        }
        if write && !direct {
            // Buffered: written here ([`inline`]).
            let fd = self.img.data_storage().file().expect(HOST_FILE).as_raw_fd();
            // SAFETY: the iovecs point into guest memory that `mem` (an
            // Arc of the map, held across the call) keeps mapped.
            let r = unsafe { inline::write(fd, &iov.0, host, n) };
            drop(mem);
            if let Err(e) = &r {
                error!("write at file offset {host}: {e}");
            }
            let committed = wio.is_none_or(|w| end_write(w, r.is_ok()));
            if r.is_err() || !committed {
                self.slots[idx].failed = true;
            }
            return;
        }
        let op = Op {
            iov,
            at,
            host,
            write,
            expect: n as usize,
            wio,
            direct,
        };
        let slot = &mut self.slots[idx];
        let opi = slot.ops.len();
        slot.ops.push(Some(op));
        slot.pending += 1;
        self.push_op(idx, opi);
    }

    fn push_op(&mut self, idx: usize, opi: usize) {
        let op = self.slots[idx].ops[opi].as_ref().expect("op");
        let fd = match (&self.files.direct, op.direct) {
            (Some(f), true) => f.as_raw_fd(),
            // Borrowed from the image, which this worker holds.
            _ => self.img.data_storage().file().expect(HOST_FILE).as_raw_fd(),
        };
        let entry = if op.write {
            opcode::Writev::new(types::Fd(fd), op.iov.0.as_ptr(), op.iov.0.len() as u32)
                .offset(op.host)
                .build()
        } else {
            opcode::Readv::new(types::Fd(fd), op.iov.0.as_ptr(), op.iov.0.len() as u32)
                .offset(op.host)
                .build()
        };
        let entry: squeue::Entry = entry.user_data(((idx as u64) << 32) | opi as u64);
        // SAFETY: the iovec array and the guest memory it points into
        // stay alive until the completion is reaped: the array is owned
        // by the op in its slot (not touched until then), and the slot
        // holds an Arc of the memory map; a worker drains its ring
        // before it is dropped, and leaks the slots when it cannot.
        // Completions reaped while the kernel's queue is full do not
        // complete this request under us: it has `pending` > 0.
        unsafe { self.push_entry(&entry) }
    }

    /// Moves request data bytes [at, at + n) to or from file offset
    /// `host` synchronously, through the bounce buffer. With O_DIRECT the
    /// data goes through the direct file whenever offset and length allow
    /// (the bounce buffer is aligned): the same file's pages must not be
    /// written both through the page cache and around it, or the kernel
    /// fails to invalidate them (EIO at the next fsync, stale cached data).
    fn bounce_io(
        &mut self,
        idx: usize,
        at: u64,
        n: u64,
        host: u64,
        write: bool,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let slot = &self.slots[idx];
        let mem = slot.mem.clone().expect("mem");
        let mut k = 0u64;
        while k < n {
            let c = (n - k).min(BOUNCE_LEN as u64) as usize;
            let pos = host + k;
            let file = match &self.files.direct {
                Some(f) if (pos | c as u64).is_multiple_of(DIRECT_ALIGN as u64) => f,
                _ => self.img.data_storage().file().expect(HOST_FILE),
            };
            let buf = &mut self.bounce[..c];
            if write {
                if !slot.req.read_data(&*mem, at + k, buf) {
                    return Err(std::io::Error::other("guest buffer not readable"));
                }
                file.write_all_at(buf, pos)?;
            } else {
                read_full_at(file, buf, pos)?;
                if !slot.req.write_data(&*mem, at + k, buf) {
                    return Err(std::io::Error::other("guest buffer not writable"));
                }
            }
            k += c as u64;
        }
        Ok(())
    }

    /// Processes every available completion.
    pub(super) fn reap(&mut self) {
        loop {
            let cqe = self.ring.completions().next();
            let Some(cqe) = cqe else { break };
            let ud = cqe.user_data();
            let (idx, opi) = ((ud >> 32) as usize, (ud & 0xffff_ffff) as usize);
            let res = cqe.result();
            let op = self.slots[idx].ops[opi].take().expect("op in flight");
            let mut ok = res >= 0 && res as usize == op.expect;
            if res == -libc::EINVAL && op.direct {
                // O_DIRECT refused what `direct_aligned` let through (a
                // stricter device): again through the aligned bounce
                // buffer, never through the page cache.
                ok = self
                    .bounce_io(idx, op.at, op.expect as u64, op.host, op.write)
                    .is_ok();
            }
            if !ok && !op.write && res >= 0 {
                // A read that stopped at the end of the file (clusters
                // allocated but never written past it): the rest reads as
                // zeros, as the engine's own reads do.
                let r = res as u64;
                let rest = op.expect as u64 - r;
                ok = self
                    .bounce_io(idx, op.at + r, rest, op.host + r, false)
                    .is_ok();
            }
            let slot = &mut self.slots[idx];
            if !ok {
                error!(
                    "{} at file offset {}: {}",
                    if op.write { "write" } else { "read" },
                    op.host,
                    if res < 0 {
                        std::io::Error::from_raw_os_error(-res).to_string()
                    } else {
                        format!("short transfer {res} of {}", op.expect)
                    }
                );
                slot.failed = true;
            }
            if let Some(w) = op.wio {
                if !end_write(w, ok) {
                    slot.failed = true;
                }
            }
            slot.pending -= 1;
            self.maybe_complete(idx);
        }
    }
}

/// Whether O_DIRECT takes these buffers at file offset `host` for `n`
/// bytes.
fn direct_aligned(iov: &[libc::iovec], host: u64, n: u64) -> bool {
    let a = DIRECT_ALIGN as u64;
    (host | n).is_multiple_of(a)
        && iov
            .iter()
            .all(|v| (v.iov_base as u64 | v.iov_len as u64).is_multiple_of(a))
}

/// Reads `buf.len()` bytes at `pos`; past the end of the file, zeros
/// (clusters allocated but never written at the file's end).
fn read_full_at(file: &std::fs::File, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut k = 0;
    while k < buf.len() {
        match file.read_at(&mut buf[k..], pos + k as u64) {
            Ok(0) => {
                buf[k..].fill(0);
                break;
            }
            Ok(r) => k += r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Builds host iovecs for request data bytes [at, at + n). False when part
/// of the range does not map to host memory.
fn build_iovecs(
    mem: &Mem,
    segs: &[(vm_memory::GuestAddress, u32)],
    at: u64,
    n: u64,
    out: &mut Vec<libc::iovec>,
) -> bool {
    let mut pos = 0u64;
    let end = at + n;
    for &(addr, len) in segs {
        let (a, b) = (pos, pos + u64::from(len));
        pos = b;
        let (s, e) = (a.max(at), b.min(end));
        if s >= e {
            continue;
        }
        for sl in GuestMemoryBackend::get_slices(mem, addr.unchecked_add(s - a), (e - s) as usize) {
            let Ok(sl) = sl else { return false };
            out.push(libc::iovec {
                iov_base: sl.ptr_guard_mut().as_ptr().cast(),
                iov_len: sl.len(),
            });
        }
        if b >= end {
            break;
        }
    }
    true
}
